"""A real container runtime on a lab node: node.py (a throwaway containerd confined to one node's
netns and a private mount namespace), networks.py (the CNI networks it runs pods with: netagent as a
node installs it, or the reference plugins) and oci_image.py (the busybox image it runs, built
locally since the machine has no registry)."""
