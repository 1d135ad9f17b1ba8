"""The bottom layer every part of netagent stands on: the CNI plugin, the agent and the lab.

What it holds is what a node's kernel and disk offer, wrapped once: entering network namespaces,
running kernel tools in them, crash-safe files, the node state file (the agent-plugin contract),
conntrack, and BPF loading and pinning. It imports nothing else of ours, so `cni/` can use it
without depending on the agent.
"""
