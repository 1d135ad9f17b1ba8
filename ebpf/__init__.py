"""The BPF programs (C, compiled by bcc at run time) as package data: nodekit.bpf reads them through
importlib.resources, so an installed wheel or the image carries them like any module.

  sock_lb.c      socket-level ClusterIP balancing (connect/sendmsg/recvmsg/getpeername), `--proxy ebpf`
  fastpath.c     tc forwarding of pod traffic between nodes, VXLAN in BPF, `--fast-path`
  decap_probe.c  `netagent doctor`'s test of whether BPF may decapsulate VXLAN GSO packets
"""
