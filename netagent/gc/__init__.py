"""Garbage collection of leaked CNI state: the agent's periodic collector and `netagent gc` by hand.

Why: a plugin or runtime killed in the middle of ADD or DEL (OOM, crash, node pressure) leaves IPs
allocated and veths on the bridge that nobody will ever DEL. The API server knows which pods run on
this node and their IPs; whatever of our network no live pod explains is released, with the reason
logged and counted in STATE/gc.json (shown by `netagent gc` and `lab status`).

One concept a module: rules.py (what is kept and what collected, never a live pod), evidence.py
(what says an attachment is in use: the pods' IPs, the runtime's sandboxes, the node's pod CIDRs),
state.py (gc.json), collector.py (one pass: evidence, rules, cni.gc.sweep, conntrack), controller.py
(the agent's pass at start and every interval) and cli.py (`netagent gc`).
"""
