"""The netns lab: a multi-node cluster on one machine, nodes and pods as network namespaces."""
