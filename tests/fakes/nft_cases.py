"""Scripts the kernel refuses and accepts, shared by the fake's unit tests and the kernel
test that checks the fake against the real `nft` (so the fake cannot drift from it)."""

from __future__ import annotations

SETUP = (
    "add table ip kpy-fake-test\n"
    "add chain ip kpy-fake-test target\n"
    "add chain ip kpy-fake-test user\n"
    "add rule ip kpy-fake-test user jump target\n"
    "add map ip kpy-fake-test dispatch { type inet_proto . inet_service : verdict; }\n"
    "add set ip kpy-fake-test addrs { type ipv4_addr; }\n"
    "add element ip kpy-fake-test dispatch { tcp . 80 : goto target }\n"
    "add element ip kpy-fake-test addrs { 198.18.0.1 }\n"
    "add chain ip kpy-fake-test uses\n"
    "add rule ip kpy-fake-test uses ip saddr @addrs accept\n"
    "add set ip kpy-fake-test spare { type ipv4_addr; }\n"
    "add element ip kpy-fake-test spare { 198.18.0.1 }\n"
)

REFUSED: dict[str, str] = {
    "jump to a missing chain": "add rule ip kpy-fake-test user jump missing\n",
    "lookup in a missing set": "add rule ip kpy-fake-test user ip daddr @missing accept\n",
    "rule in a missing chain": "add rule ip kpy-fake-test missing accept\n",
    "verdict element to a missing chain": (
        "add element ip kpy-fake-test dispatch { tcp . 81 : goto missing }\n"
    ),
    "element of a missing map": "add element ip kpy-fake-test missing { 198.18.0.2 }\n",
    "element added again with other data": (
        "add element ip kpy-fake-test dispatch { tcp . 80 : drop }\n"
    ),
    "missing element deleted": "delete element ip kpy-fake-test addrs { 198.18.0.9 }\n",
    "chain deleted while jumped to": "delete chain ip kpy-fake-test target\n",
    "missing table deleted": "delete table ip kpy-fake-missing\n",
    "set deleted while a rule uses it": "delete set ip kpy-fake-test addrs\n",
    "missing chain listed": "list chain ip kpy-fake-test missing\n",
}
"""Each refused as a whole, after a first line that alone would be accepted."""

ACCEPTED: dict[str, str] = {
    "the same element added twice": "add element ip kpy-fake-test addrs { 198.18.0.1 }\n",
    "a chain added twice": "add chain ip kpy-fake-test target\n",
    "a chain holding rules deleted (nothing jumps to it)": "delete chain ip kpy-fake-test user\n",
    "element, then the chain it jumped to": (
        "delete element ip kpy-fake-test dispatch { tcp . 80 }\n"
        "flush chain ip kpy-fake-test user\n"
        "delete chain ip kpy-fake-test user\n"
        "delete chain ip kpy-fake-test target\n"
    ),
    "a set deleted with its elements": "delete set ip kpy-fake-test spare\n",
    "a table deleted and added again": (
        "add table ip kpy-fake-test\ndelete table ip kpy-fake-test\nadd table ip kpy-fake-test\n"
    ),
}

FIRST = "add element ip kpy-fake-test addrs { 198.18.0.3 }\n"
"""Accepted alone; put before each refused script to show nothing of it is applied."""
