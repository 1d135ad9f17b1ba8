"""netagent: a per-node Kubernetes networking data plane (CNI plugin, node agent, netns lab)."""

__version__ = "0.1.0"
