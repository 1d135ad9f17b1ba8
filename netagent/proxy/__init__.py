"""kube-proxy replacement: one service model, interchangeable kernel backends."""
