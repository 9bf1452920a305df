"""The iptables backend, for iptables-nft and iptables-legacy (design in `backend`).

Importing this package registers the backend as "iptables".
"""

from proxy.backends.iptables.backend import IptablesBackend

__all__ = ["IptablesBackend"]
