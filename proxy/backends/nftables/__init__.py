"""The nftables backend: one table of our own, verdict-map dispatch (design in `backend`).

Importing this package registers the backend as "nftables".
"""

from proxy.backends.nftables.backend import NftablesBackend

__all__ = ["NftablesBackend"]
