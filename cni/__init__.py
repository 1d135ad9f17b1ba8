"""CNI plugin: veth pairs onto a node bridge, IPAM from the node pod CIDR (CNI spec 1.0/1.1).

Modules, in the order a request flows through them:
    plugin      entry point: handle(env, stdin) -> (exit code, stdout), used exec'd and by the agent
    config      CNI_* environment and network config, validated into dataclasses
    attachment  ADD / DEL / CHECK of one (container id, ifname)
    links       netlink work (bridge, veth, pod interface) through pyroute2
    ipam        on-disk, crash-safe address allocations
    masq        nftables masquerade for ipMasq
    result      the spec's ADD result object
    gc          CNI GC verb and the agent's periodic collector
    install     `netagent install-cni`: the compiled shim (shim.c) and the conflist
    errors      CniError and the spec's error codes
"""
