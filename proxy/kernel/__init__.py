"""The only code that runs kernel tools, speaks netlink or writes kernel tunables, each behind
a small interface: `commands` (tools), `iptables`, `sysctl` (/proc/sys and module parameters).
"""
