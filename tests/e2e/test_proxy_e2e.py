"""The real `python -m proxy` against the lab control plane, checked with real packets.

One lab per proxy mode (namespaces, API double, echo pods); the proxy process runs in
the node namespace exactly as the lab runs it, with `--proxy-mode` iptables, then
nftables. Every step waits (bounded) for the data plane to converge and checks it from
the client or a pod.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import pytest

from lab.cluster import HEALTHZ_PORT, LabCluster
from lab.probe import EchoReply, ProbeFailure, probe, spread

pytestmark = pytest.mark.e2e

WEB = {"app": "web"}
MODES = ["iptables", "nftables"]


@pytest.fixture(scope="module", params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def start(cluster: LabCluster, mode: str, *args: str) -> None:
    """The proxy in `mode`, with that mode's sync-period flags."""
    prefix = "nftables" if mode == "nftables" else "iptables"
    cluster.start_proxy(f"--proxy-mode={mode}", f"--{prefix}-min-sync-period=100ms", *args)


@pytest.fixture(scope="module")
def lab(mode: str) -> Iterator[LabCluster]:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("end-to-end tests must run as root on CI")
        pytest.skip("end-to-end tests need root (network namespaces, iptables)")
    cluster = LabCluster.start(bookmark_interval=2.0)
    try:
        for index in (1, 2):
            cluster.add_pod(f"web-{index}", WEB)
        start(
            cluster, mode, f"--{'nftables' if mode == 'nftables' else 'iptables'}-sync-period=30s"
        )
        yield cluster
    finally:
        log = cluster.proxy_log.read_text(errors="replace") if cluster.proxy_log.exists() else ""
        cluster.close()
        print("---- proxy log (tail) ----\n" + "\n".join(log.splitlines()[-40:]))


def answers(lab: LabCluster, ip: str, port: int, expect: set[str], proto: str = "tcp") -> bool:
    seen = spread(lab.topology.client_ns, ip, port, proto, 4 * len(expect) + 6)  # type: ignore[arg-type]
    return set(seen) == expect


def refused(lab: LabCluster, ip: str, port: int) -> bool:
    result = probe(lab.topology.client_ns, ip, port, "tcp", timeout=0.5)
    return isinstance(result, ProbeFailure) and result.kind == "refused"


def test_first_sync_and_health(lab: LabCluster) -> None:
    lab.wait_proxy_ready()
    code, body = lab.http_get(HEALTHZ_PORT, "/healthz")
    assert code == 200
    answer = json.loads(body)
    assert {"lastUpdated", "currentTime", "nodeEligible", "healthy"} <= set(answer)
    assert answer["status"]["IPv4"]["healthy"] is True


def test_create_update_delete_converge(lab: LabCluster) -> None:
    lab.wait_proxy_ready()
    web = lab.create_service(
        "web", WEB, [{"name": "http", "port": 80, "targetPort": "http"}], service_type="NodePort"
    )
    ip = web["spec"]["clusterIP"]
    node_port = web["spec"]["ports"][0]["nodePort"]
    lab.wait_for("ClusterIP spread", lambda: answers(lab, ip, 80, {"web-1", "web-2"}))
    lab.wait_for(
        "NodePort spread",
        lambda: answers(lab, lab.topology.node_ip, node_port, {"web-1", "web-2"}),
    )

    # Scale up: a new endpoint starts answering.
    lab.add_pod("web-3", WEB)
    lab.wait_for("web-3 joins", lambda: answers(lab, ip, 80, {"web-1", "web-2", "web-3"}))

    # Scale to zero: the VIP is REJECTed (refused at once), not black-holed.
    for name in ("web-1", "web-2", "web-3"):
        lab.remove_pod(name)
    lab.wait_for("REJECT without endpoints", lambda: refused(lab, ip, 80))

    # Update: change the port; the old port stops, the new one answers.
    lab.add_pod("web-4", WEB)
    lab.wait_for("web-4 answers", lambda: answers(lab, ip, 80, {"web-4"}))
    current = lab.api.get("services", "web", namespace="default")
    current["spec"]["ports"][0]["port"] = 81
    lab.api.update("services", current, namespace="default")
    lab.wait_for("port 81 answers", lambda: answers(lab, ip, 81, {"web-4"}))
    assert not isinstance(probe(lab.topology.client_ns, ip, 80, "tcp", timeout=0.5), EchoReply)

    # Delete: the VIP stops answering.
    lab.delete_service("web")
    lab.wait_for(
        "the deleted VIP to stop answering",
        lambda: (
            not isinstance(probe(lab.topology.client_ns, ip, 81, "tcp", timeout=0.5), EchoReply)
        ),
    )


def test_deletion_during_a_broken_watch_is_applied_after_the_410_relist(
    lab: LabCluster, mode: str
) -> None:
    lab.wait_proxy_ready()
    if "web-4" not in lab.echo:
        lab.add_pod("web-4", WEB)
    gone = lab.create_service("gone", WEB, [{"name": "http", "port": 80, "targetPort": "http"}])
    ip = gone["spec"]["clusterIP"]
    lab.wait_for("gone answers", lambda: answers(lab, ip, 80, {"web-4"}))
    assert programmed(lab, mode, ip)
    changes_before = lab.metrics()["kubeproxy_sync_proxy_rules_service_changes_total"]

    # The API server goes away; while it is down the service is deleted and the
    # history compacted, so the proxy's resume gets 410 Gone and must relist.
    lab.api.stop()
    lab.api.delete("services", "gone", namespace="default")
    lab.api.compact()
    lab.restart_api()
    lab.wait_for(
        "the service deleted during the outage to leave the kernel and stop answering",
        lambda: not programmed(lab, mode, ip) and not answers_at_all(lab, ip, 80),
        timeout=60,
    )
    # It left through the relist's sweep: the proxy saw a service change after the outage.
    assert lab.metrics()["kubeproxy_sync_proxy_rules_service_changes_total"] > changes_before


def kernel_rules(lab: LabCluster) -> str:
    """The node's nat and filter tables as both iptables variants print them, and the
    whole nftables ruleset."""
    saved = [
        lab.topology.run_in(lab.topology.node_ns, [tool, "-t", table]).stdout
        for tool in ("iptables-nft-save", "iptables-legacy-save")
        for table in ("nat", "filter")
    ]
    saved.append(lab.topology.run_in(lab.topology.node_ns, ["nft", "list", "ruleset"]).stdout)
    return "".join(saved)


def programmed(lab: LabCluster, mode: str, vip: str) -> bool:
    """Does the kernel hold rules (or map elements) for this ClusterIP?"""
    rules = kernel_rules(lab)
    return f"{vip} . tcp . 80" in rules if mode == "nftables" else f"-d {vip}/32" in rules


def ours(lab: LabCluster) -> list[str]:
    """What of ours the kernel holds: KPY- chains (iptables), our nftables table."""
    rules = kernel_rules(lab)
    marks = ("KPY-", "table ip kube-proxy-py", "table ip6 kube-proxy-py")
    return [mark for mark in marks if mark in rules]


def answers_at_all(lab: LabCluster, ip: str, port: int) -> bool:
    return isinstance(probe(lab.topology.client_ns, ip, port, "tcp", timeout=0.5), EchoReply)


def test_node_tainted_for_deletion_fails_healthz_but_not_livez(lab: LabCluster) -> None:
    lab.wait_proxy_ready()
    node = lab.api.get("nodes", "lab-node")
    node.setdefault("spec", {})["taints"] = [
        {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}
    ]
    lab.api.update("nodes", node)
    lab.wait_for("/healthz 503", lambda: lab.http_get(HEALTHZ_PORT, "/healthz")[0] == 503)
    _, body = lab.http_get(HEALTHZ_PORT, "/healthz")
    answer = json.loads(body)
    assert answer["nodeEligible"] is False
    assert answer["healthy"] is True  # the proxier itself is fine (upstream's v1.33 body)
    assert lab.http_get(HEALTHZ_PORT, "/livez")[0] == 200
    node = lab.api.get("nodes", "lab-node")
    node["spec"]["taints"] = []
    lab.api.update("nodes", node)
    lab.wait_for("/healthz 200", lambda: lab.http_get(HEALTHZ_PORT, "/healthz")[0] == 200)


def test_restart_while_the_api_is_down_keeps_the_rules(lab: LabCluster, mode: str) -> None:
    lab.wait_proxy_ready()
    if "web-4" not in lab.echo:
        lab.add_pod("web-4", WEB)
    kept = lab.create_service("kept", WEB, [{"name": "http", "port": 80, "targetPort": "http"}])
    ip = kept["spec"]["clusterIP"]
    lab.wait_for("kept answers", lambda: answers(lab, ip, 80, {"web-4"}))

    # SIGTERM: the proxy exits 0 and leaves its rules in place.
    assert lab.stop_proxy() == 0
    assert answers(lab, ip, 80, {"web-4"})
    # Start again with no API server: the old rules keep serving while it retries.
    lab.api.stop()
    start(lab, mode)
    lab.wait_for(
        "the proxy to log that the API is unreachable",
        lambda: "list failed" in lab.proxy_log.read_text(errors="replace"),
    )
    assert answers(lab, ip, 80, {"web-4"})
    # The API returns with a change made meanwhile: the proxy converges.
    lab.api.delete("services", "kept", namespace="default")
    lab.restart_api()
    lab.wait_for("the deleted service to stop answering", lambda: not answers_at_all(lab, ip, 80))
    lab.wait_proxy_ready()


def test_cleanup_removes_our_rules_and_is_idempotent(lab: LabCluster, mode: str) -> None:
    lab.wait_proxy_ready()
    if mode == "nftables":
        # The ip6 table too when the node runs both families (one backend per family).
        assert "table ip kube-proxy-py" in ours(lab)
        assert "KPY-" not in ours(lab)
    else:
        assert ours(lab) == ["KPY-"]
    lab.stop_proxy()
    for _ in range(2):  # the second run has nothing to remove and still exits 0
        done = lab.topology.run_in(
            lab.topology.node_ns,
            [sys.executable, "-m", "proxy", "--cleanup", "--hostname-override=lab-node"],
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert ours(lab) == []
