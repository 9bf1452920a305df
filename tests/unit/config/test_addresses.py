"""Bind addresses, IP:port, the pod CIDRs and the NodePort address filter."""

from __future__ import annotations

import re

import pytest

from proxy.config.addresses import (
    parse_bind_address,
    parse_cluster_cidrs,
    parse_nodeport_addresses,
    split_host_port,
)
from proxy.config.errors import BadValueError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0", "0.0.0.0:10256"),
        ("198.18.0.1:9999", "198.18.0.1:9999"),
        ("198.018.000.001:9999", "198.18.0.1:9999"),
        ("::", "[::]:10256"),
        ("[::1]:10256", "[::1]:10256"),
        ("[fd00::0001]:80", "[fd00::1]:80"),
        (" 198.18.0.1 ", "198.18.0.1:10256"),
        ("::1:80", "[::1:80]:10256"),  # an IPv6 address, not host:port (as in Go)
    ],
)
def test_bind_address_forms(text: str, expected: str) -> None:
    assert parse_bind_address(text, 10256) == expected


@pytest.mark.parametrize(
    "text",
    ["localhost:10249", "198.18.0.1:0", "198.18.0.1:65536", "198.18.0.1:", ":10249",
     "[198.18.0.1]:80", "fe80::1%eth0", "198.18.0.999", "[::1]", "198.18.0.1:http"],
)  # fmt: skip
def test_bind_address_rejects(text: str) -> None:
    with pytest.raises(BadValueError):
        parse_bind_address(text, 10256)


def test_split_host_port_allows_port_zero_for_servers() -> None:
    assert split_host_port("127.0.0.1:0") == ("127.0.0.1", 0)
    assert split_host_port("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ValueError):
        split_host_port("127.0.0.1")


def test_cluster_cidrs_are_normalised_and_at_most_a_dual_stack_pair() -> None:
    assert parse_cluster_cidrs(["198.18.0.1/15", " fd00::/64 "]) == ("198.18.0.0/15", "fd00::/64")
    assert parse_cluster_cidrs(["198.018.0.0/16"]) == ("198.18.0.0/16",)
    assert parse_cluster_cidrs([""]) == ()
    with pytest.raises(BadValueError, match="dual-stack pair: one IPv4 and one IPv6"):
        parse_cluster_cidrs(["198.18.0.0/16", "198.19.0.0/16"])
    with pytest.raises(BadValueError, match="one CIDR or a dual-stack pair"):
        parse_cluster_cidrs(["198.18.0.0/16", "fd00::/64", "fd01::/64"])
    with pytest.raises(BadValueError, match=re.escape('"198.18.0.0/33"')):
        parse_cluster_cidrs(["198.18.0.0/33"])


def test_nodeport_addresses_are_cidrs_or_primary_alone() -> None:
    cidrs = ("198.18.0.0/24", "fd00::/64")
    assert parse_nodeport_addresses(list(cidrs)) == cidrs
    assert parse_nodeport_addresses(["primary"]) == ("primary",)
    with pytest.raises(BadValueError, match="primary"):
        parse_nodeport_addresses(["primary", "198.18.0.0/24"])
    with pytest.raises(BadValueError, match=re.escape('"198.18.0.1"')):
        parse_nodeport_addresses(["198.18.0.1"])
