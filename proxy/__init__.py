"""kube-proxy-py: a kube-proxy replacement that programs the kernel from Python."""

__version__ = "0.1.0"
