"""CNI plugin: veth pairs onto a node bridge, IPAM from the node pod CIDR (CNI spec 1.0/1.1)."""
