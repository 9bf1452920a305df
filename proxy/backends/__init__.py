"""Kernel backends (iptables now; nftables and IPVS join by adding a module here).

Each backend module registers itself with `@register("name")` from
`proxy.backends.base`; `base.create` imports every module of this package once, so a
new backend needs no change to the core or to this file.
"""
