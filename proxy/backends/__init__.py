"""Kernel backends, one subpackage each (iptables now; nftables and IPVS join the same way).

A backend subpackage `proxy.backends.<name>` registers itself with `@register("<name>")`
from `proxy.backends.base` when imported; `base.create(name, config)` imports only that
subpackage, so a new backend needs no change to the core or to this file.
"""
