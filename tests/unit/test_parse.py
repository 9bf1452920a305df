"""Parsing raw API objects: the good path and every kind of bad input."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.model import IPFamily, Protocol, ServiceInfo, ServiceKey
from proxy.parse import (
    Skipped,
    normalize_cidr,
    normalize_ip,
    parse_node,
    parse_service,
    parse_slice,
)


def service(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "metadata": {"namespace": "ns", "name": "web"},
        "spec": {"clusterIP": "198.19.0.10", "ports": [{"name": "http", "port": 80}]},
    }
    base["spec"].update(spec)
    return base


class Sink:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, reason: str, message: str) -> None:
        self.seen.append((reason, message))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.19.0.10", "198.19.0.10"),
        ("172.30.0.041", "172.30.0.41"),
        (" 10.0.0.1 ", "10.0.0.1"),
        ("10.0.0.999", None),
        ("abc", None),
        ("", None),
        ("1.2.3", None),
        ("fd00::0001", "fd00::1"),
    ],
)
def test_normalize_ip(text: str, expected: str | None) -> None:
    assert normalize_ip(text) == expected


def test_normalize_cidr_reads_leading_zeros_and_clears_host_bits() -> None:
    assert normalize_cidr("203.0.113.000/025") == "203.0.113.0/25"
    assert normalize_cidr(" 0.0.0.0/0 ") == "0.0.0.0/0"
    assert normalize_cidr("10.0.0.1/33") is None
    assert normalize_cidr("nonsense") is None


def test_cluster_ip_service_ports() -> None:
    parsed = parse_service(
        service(
            ports=[
                {"name": "http", "port": 80},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "sctp", "port": 9, "protocol": "SCTP"},
            ]
        )
    )
    assert isinstance(parsed, ServiceInfo)
    assert [(p.name.port, p.protocol, p.port) for p in parsed.ports] == [
        ("http", Protocol.TCP, 80),
        ("dns", Protocol.UDP, 53),
        ("sctp", Protocol.SCTP, 9),
    ]
    assert parsed.ports[0].cluster_ips == ("198.19.0.10",)
    assert str(parsed.ports[0].name) == "ns/web:http"


def test_node_port_only_for_node_port_types() -> None:
    ports = [{"name": "http", "port": 80, "nodePort": 30080}]
    node_port = parse_service(service(type="NodePort", ports=ports))
    cluster = parse_service(service(ports=ports))
    assert isinstance(node_port, ServiceInfo) and isinstance(cluster, ServiceInfo)
    assert node_port.ports[0].node_port == 30080
    assert cluster.ports[0].node_port == 0


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"clusterIP": "None"}, "headless"),
        ({"clusterIP": ""}, "headless"),
        ({"type": "ExternalName", "externalName": "example.org"}, "ExternalName"),
    ],
)
def test_deliberate_skips_are_not_errors(spec: dict[str, Any], reason: str) -> None:
    sink = Sink()
    parsed = parse_service(service(**spec), sink)
    assert isinstance(parsed, Skipped)
    assert parsed.reason == reason and not parsed.error
    assert sink.seen == []


def test_service_proxy_name_label_is_skipped() -> None:
    raw = service()
    raw["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    parsed = parse_service(raw)
    assert isinstance(parsed, Skipped) and not parsed.error


@pytest.mark.parametrize("bad_ip", ["10.0.0.999", "abc"])
def test_unparsable_cluster_ip_skips_service_and_reports(bad_ip: str) -> None:
    sink = Sink()
    parsed = parse_service(service(clusterIP=bad_ip, clusterIPs=[bad_ip]), sink)
    assert isinstance(parsed, Skipped) and parsed.error
    assert sink.seen[0][0] == "invalid_cluster_ip"
    assert "ns/web" in sink.seen[0][1] and bad_ip in sink.seen[0][1]


def test_leading_zero_cluster_ip_is_normalised() -> None:
    parsed = parse_service(service(clusterIP="198.019.000.010"))
    assert isinstance(parsed, ServiceInfo)
    assert parsed.ports[0].cluster_ips == ("198.19.0.10",)


def test_bad_ports_are_dropped_and_the_rest_kept() -> None:
    sink = Sink()
    parsed = parse_service(
        service(
            ports=[
                {"name": "zero", "port": 0},
                {"name": "big", "port": 70000},
                {"name": "neg", "port": -1},
                {"name": "proto", "port": 81, "protocol": "ICMP"},
                {"name": "ok", "port": 82},
            ]
        ),
        sink,
    )
    assert isinstance(parsed, ServiceInfo)
    assert [p.name.port for p in parsed.ports] == ["ok"]
    assert sorted(r for r, _ in sink.seen) == [
        "invalid_port",
        "invalid_port",
        "invalid_port",
        "invalid_protocol",
    ]
    assert any("ICMP" in m and "ns/web" in m for _, m in sink.seen)


def test_same_port_on_tcp_and_udp_are_two_ports() -> None:
    parsed = parse_service(
        service(ports=[{"name": "dns", "port": 53}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    )
    assert isinstance(parsed, ServiceInfo)
    assert {p.protocol for p in parsed.ports} == {Protocol.TCP, Protocol.UDP}


def test_affinity_and_policies_are_parsed() -> None:
    parsed = parse_service(
        service(
            type="LoadBalancer",
            sessionAffinity="ClientIP",
            externalTrafficPolicy="Local",
            internalTrafficPolicy="Local",
            healthCheckNodePort=31000,
            loadBalancerSourceRanges=[" 203.0.113.000/025 ", "junk"],
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        )
        | {}
    )
    assert isinstance(parsed, ServiceInfo)
    port = parsed.ports[0]
    assert port.session_affinity_seconds == 10800
    assert port.external_policy_local and port.internal_policy_local
    assert port.health_check_node_port == 31000
    assert port.load_balancer_source_ranges == ("203.0.113.0/25",)


def test_lb_ingress_skips_proxy_mode() -> None:
    raw = service(type="LoadBalancer")
    raw["status"] = {
        "loadBalancer": {
            "ingress": [{"ip": "198.18.200.1"}, {"ip": "198.18.200.2", "ipMode": "Proxy"}]
        }
    }
    parsed = parse_service(raw)
    assert isinstance(parsed, ServiceInfo)
    assert parsed.ports[0].load_balancer_ips == ("198.18.200.1",)


def slice_(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "metadata": {
            "namespace": "ns",
            "name": "web-abc",
            "labels": {"kubernetes.io/service-name": "web"},
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": "2026-01-02T03:04:05.5Z"
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["198.18.64.5"], "conditions": {"ready": True}, "nodeName": "n1"},
        ],
    }
    raw.update(extra)
    return raw


def test_slice_parsing_and_conditions() -> None:
    parsed = parse_slice(
        slice_(
            endpoints=[
                {"addresses": ["198.18.64.5"], "conditions": {}},
                {"addresses": ["198.18.64.6"], "conditions": {"ready": False}},
                {
                    "addresses": ["198.18.64.7"],
                    "conditions": {"ready": False, "serving": True, "terminating": True},
                    "hints": {"forZones": [{"name": "a"}]},
                },
            ]
        )
    )
    assert parsed is not None
    assert parsed.service == ServiceKey("ns", "web")
    assert parsed.family is IPFamily.V4
    assert parsed.trigger_time == pytest.approx(1767323045.5)
    first, second, third = parsed.endpoints
    assert (first.ready, first.serving, first.terminating) == (True, True, False)
    assert (second.ready, second.serving) == (False, False)
    assert (third.ready, third.serving, third.terminating) == (False, True, True)
    assert third.zone_hints == frozenset({"a"})


def test_slice_bad_endpoints_and_ports_are_filtered() -> None:
    sink = Sink()
    parsed = parse_slice(
        slice_(
            ports=[{"name": "http", "port": 8080}, {"name": None, "port": 0}],
            endpoints=[
                {"addresses": []},
                {"addresses": ["fd00::1"]},
                {"addresses": ["999.1.1.1"]},
                {"addresses": ["198.18.64.9"]},
            ],
        ),
        sink,
    )
    assert parsed is not None
    assert [e.ip for e in parsed.endpoints] == ["198.18.64.9"]
    assert [p.port for p in parsed.ports] == [8080]
    assert len(sink.seen) == 4


def test_slice_without_service_label_or_fqdn_is_ignored() -> None:
    raw = slice_()
    raw["metadata"]["labels"] = {}
    assert parse_slice(raw) is None
    assert parse_slice(slice_(addressType="FQDN")) is None


def test_node_parsing() -> None:
    node = parse_node(
        {
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.2"}]},
        }
    )
    assert node.addresses == ("198.18.0.2",)
    assert node.zone == "z1"
    assert not node.eligible
    deleting = parse_node({"metadata": {"name": "n1", "deletionTimestamp": "2026-01-01T00:00:00Z"}})
    assert not deleting.eligible
    assert parse_node({"metadata": {"name": "n1"}}).eligible


# -- bad input in the Service features of issue 13: the bad part goes, the rest stays -------


def lb_service(**spec: Any) -> dict[str, Any]:
    raw = service(
        type="LoadBalancer",
        ports=[{"name": "http", "port": 80, "nodePort": 30080}, {"name": "dns", "port": 53}],
        externalIPs=["198.19.200.1"],
        **spec,
    )
    raw["status"] = {"loadBalancer": {"ingress": [{"ip": "198.19.200.2"}]}}
    return raw


def test_a_source_range_that_is_not_a_cidr_is_skipped_and_reported() -> None:
    sink = Sink()
    parsed = parse_service(
        lb_service(loadBalancerSourceRanges=["198.18.200.0/24", "10.0.0.0/33", "not-a-cidr"]),
        sink,
    )
    assert isinstance(parsed, ServiceInfo)
    assert [p.name.port for p in parsed.ports] == ["http", "dns"]
    for port in parsed.ports:
        assert port.load_balancer_source_ranges == ("198.18.200.0/24",)
        assert port.load_balancer_ips == ("198.19.200.2",)
    assert [reason for reason, _ in sink.seen] == ["invalid_cidr", "invalid_cidr"]
    assert all("ns/web" in message for _, message in sink.seen)
    assert "not-a-cidr" in sink.seen[1][1]


def test_a_hostname_only_ingress_entry_is_skipped_and_reported() -> None:
    sink = Sink()
    raw = lb_service(loadBalancerSourceRanges=["198.18.200.0/24"])
    raw["status"]["loadBalancer"]["ingress"] = [
        {"hostname": "lb.example.test"},
        {"ip": "198.19.200.2"},
        {"ip": "198.19.200.3", "ipMode": "Proxy"},
    ]
    parsed = parse_service(raw, sink)
    assert isinstance(parsed, ServiceInfo)
    assert parsed.ports[0].load_balancer_ips == ("198.19.200.2",)
    assert parsed.ports[0].load_balancer_source_ranges == ("198.18.200.0/24",)
    assert parsed.ports[0].external_ips == ("198.19.200.1",)
    assert [reason for reason, _ in sink.seen] == ["lb_ingress_without_ip"]
    assert "ns/web" in sink.seen[0][1] and "lb.example.test" in sink.seen[0][1]


def test_an_ipv6_address_in_an_ipv4_slice_is_skipped_and_reported() -> None:
    sink = Sink()
    parsed = parse_slice(
        slice_(
            endpoints=[
                {"addresses": ["198.18.64.5"]},
                {"addresses": ["fd00::5"]},
                {"addresses": ["198.18.64.6"]},
            ]
        ),
        sink,
    )
    assert parsed is not None
    assert [endpoint.ip for endpoint in parsed.endpoints] == ["198.18.64.5", "198.18.64.6"]
    assert [reason for reason, _ in sink.seen] == ["invalid_endpoint"]
    assert "endpointslice ns/web-abc" in sink.seen[0][1] and "fd00::5" in sink.seen[0][1]


@pytest.mark.parametrize("timeout", [0, -5, 86401, "60", True])
def test_an_affinity_timeout_out_of_range_is_reported_and_the_default_kept(timeout: object) -> None:
    sink = Sink()
    parsed = parse_service(
        lb_service(
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}},
        ),
        sink,
    )
    assert isinstance(parsed, ServiceInfo)
    assert [p.session_affinity_seconds for p in parsed.ports] == [10800, 10800]
    assert [p.load_balancer_ips for p in parsed.ports] == [("198.19.200.2",)] * 2
    assert [reason for reason, _ in sink.seen] == ["invalid_affinity_timeout"]
    assert "ns/web" in sink.seen[0][1]


def test_an_affinity_timeout_in_range_is_kept_silently() -> None:
    sink = Sink()
    parsed = parse_service(
        service(
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86400}},
        ),
        sink,
    )
    assert isinstance(parsed, ServiceInfo)
    assert parsed.ports[0].session_affinity_seconds == 86400
    assert sink.seen == []


def test_node_addresses_put_internal_ips_before_external_ones_as_upstream() -> None:
    """GetNodeHostIPs: InternalIPs first, then ExternalIPs; "primary" NodePorts take the
    first of each family from this order."""
    node = parse_node(
        {
            "metadata": {"name": "n1"},
            "status": {
                "addresses": [
                    {"type": "ExternalIP", "address": "198.18.9.9"},
                    {"type": "Hostname", "address": "n1"},
                    {"type": "InternalIP", "address": "2001:2::2"},
                    {"type": "InternalIP", "address": "198.18.0.2"},
                ]
            },
        }
    )
    assert node.addresses == ("2001:2::2", "198.18.0.2", "198.18.9.9")
