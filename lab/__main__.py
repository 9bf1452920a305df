"""`python -m lab`: watch the real proxy program a one-node cluster, then clean up.

With no arguments it builds the lab (`LabCluster`), creates a few services, shows
requests to a ClusterIP and a NodePort spreading over pods from inside and outside
the cluster, scales a deployment up and down while timing how long the proxy takes
to converge, prints what the proxy reported in its own /metrics, and removes
everything it made: on success, on Ctrl-C, on SIGTERM and after a crash (the next run
also removes what a killed run left behind).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

from lab.cluster import LabCluster
from lab.probe import EchoReply, probe, spread

WEB = {"app": "web"}
DNS = {"app": "dns"}
REQUESTS = 30


def say(text: str = "") -> None:
    print(text, flush=True)


def show_spread(label: str, seen: Counter[str]) -> None:
    parts = ", ".join(f"{pod}: {count}" for pod, count in sorted(seen.items()))
    say(f"  {label:<44} {parts}")


def source_seen(netns: str, ip: str, port: int, proto: str) -> str:
    result = probe(netns, ip, port, "tcp" if proto == "TCP" else "udp")
    return result.src_ip if isinstance(result, EchoReply) else f"({result.kind})"


def cluster_ip(service: dict[str, Any]) -> str:
    return str(service["spec"]["clusterIP"])


def answering(lab: LabCluster, ip: str, port: int, expect: set[str]) -> Callable[[], bool]:
    def check() -> bool:
        seen = spread(lab.topology.client_ns, ip, port, "tcp", 3 * len(expect) + 6)
        return set(seen) == expect

    return check


def demo(lab: LabCluster) -> None:
    topo = lab.topology
    say("== pods and services")
    for index in (1, 2, 3):
        pod = lab.add_pod(f"web-{index}", WEB)
        say(f"  pod web-{index} at {pod.ip} (echo on TCP 8080, UDP 5353)")
    for index in (1, 2):
        pod = lab.add_pod(f"dns-{index}", DNS)
        say(f"  pod dns-{index} at {pod.ip}")
    web = lab.create_service(
        "web", WEB, [{"name": "http", "port": 80, "targetPort": "http"}], service_type="NodePort"
    )
    dns = lab.create_service(
        "dns", DNS, [{"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]
    )
    empty = lab.create_service("empty", {"app": "nothing"}, [{"name": "http", "port": 80}])
    web_ip, dns_ip, empty_ip = cluster_ip(web), cluster_ip(dns), cluster_ip(empty)
    node_port = int(web["spec"]["ports"][0]["nodePort"])
    say(f"  service web   ClusterIP {web_ip}:80/TCP, NodePort {topo.node_ip}:{node_port}")
    say(f"  service dns   ClusterIP {dns_ip}:53/UDP")
    say(f"  service empty ClusterIP {empty_ip}:80/TCP (no endpoints)")

    say("\n== the proxy")
    lab.start_proxy("--iptables-min-sync-period=100ms")
    took = lab.wait_proxy_ready()
    say(f"  python -m proxy runs in {topo.node_ns}; first sync and /healthz 200 after {took:.1f} s")
    say(f"  API server for kubectl (inside the node namespace): {lab.api_url}")

    say(f"\n== {REQUESTS} requests each")
    pod_ns = topo.pods["web-1"].netns
    show_spread(
        f"ClusterIP {web_ip}:80 from the client",
        spread(topo.client_ns, web_ip, 80, "tcp", REQUESTS),
    )
    show_spread(
        f"ClusterIP {web_ip}:80 from pod dns-1",
        spread(topo.pods["dns-1"].netns, web_ip, 80, "tcp", REQUESTS),
    )
    show_spread(
        f"NodePort {topo.node_ip}:{node_port} from the client",
        spread(topo.client_ns, topo.node_ip, node_port, "tcp", REQUESTS),
    )
    show_spread(
        f"ClusterIP {dns_ip}:53/UDP from pod web-1", spread(pod_ns, dns_ip, 53, "udp", REQUESTS)
    )
    show_spread(f"ClusterIP {empty_ip}:80 (no endpoints)", spread(pod_ns, empty_ip, 80, "tcp", 3))
    say("  source address the web pod saw:")
    dns1 = topo.pods["dns-1"]
    kept = source_seen(dns1.netns, web_ip, 80, "TCP")
    masqueraded = source_seen(topo.client_ns, web_ip, 80, "TCP")
    say(f"    from pod dns-1 {dns1.ip:<15} -> {kept} (kept: inside the cluster CIDR)")
    say(f"    from the client {topo.client_ip:<14} -> {masqueraded} (masqueraded: from outside)")

    say("\n== scale web from 3 to 5 pods")
    for index in (4, 5):
        lab.add_pod(f"web-{index}", WEB)
    five = {f"web-{i}" for i in range(1, 6)}
    took = lab.wait_for("web-4 and web-5 to answer", answering(lab, web_ip, 80, five))
    say(f"  all 5 pods answer after {took:.2f} s")
    show_spread("ClusterIP from the client", spread(topo.client_ns, web_ip, 80, "tcp", REQUESTS))

    say("\n== scale web down to 1 pod")
    for index in (2, 3, 4, 5):
        lab.remove_pod(f"web-{index}")
    took = lab.wait_for("only web-1 to answer", answering(lab, web_ip, 80, {"web-1"}))
    say(f"  only web-1 answers after {took:.2f} s")

    say("\n== delete service dns")
    lab.delete_service("dns")
    took = lab.wait_for(
        "the dns VIP to stop answering",
        lambda: not isinstance(probe(pod_ns, dns_ip, 53, "udp", timeout=0.3), EchoReply),
    )
    say(f"  {dns_ip}:53/UDP stopped answering after {took:.2f} s")

    say("\n== what the proxy reported (its own /metrics)")
    report_metrics(lab.metrics())


def report_metrics(m: dict[str, float]) -> None:
    def line(label: str, prefix: str) -> None:
        count = m.get(f"{prefix}_count", 0.0)
        total = m.get(f"{prefix}_sum", 0.0)
        mean = f"mean {1000 * total / count:.1f} ms" if count else ""
        say(f"  {label:<38} {int(count):>4}  {mean}")

    line("syncs (all)", "kubeproxy_sync_proxy_rules_duration_seconds")
    line("full syncs", "kubeproxy_sync_full_proxy_rules_duration_seconds")
    line("partial syncs", "kubeproxy_sync_partial_proxy_rules_duration_seconds")
    line("network programming (API write->rules)", "kubeproxy_network_programming_duration_seconds")
    say(
        f"  {'service / endpoint changes seen':<38} "
        f"{int(m.get('kubeproxy_sync_proxy_rules_service_changes_total', 0))} / "
        f"{int(m.get('kubeproxy_sync_proxy_rules_endpoint_changes_total', 0))}"
    )
    failures = m.get("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", 0.0)
    say(f"  {'iptables-restore failures':<38} {int(failures)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep", action="store_true", help="leave the lab running until Ctrl-C before cleaning up"
    )
    args = parser.parse_args(argv)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    lab: LabCluster | None = None
    try:
        lab = LabCluster.start()
        topo = lab.topology
        say(f"lab {topo.prefix}: node {topo.node_ip}, client {topo.client_ip}")
        demo(lab)
        if args.keep:
            say("\n--keep: the lab stays up; press Ctrl-C to remove it")
            signal.pause()
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    except Exception as err:
        say(f"\nlab failed: {err}")
        if lab is not None and lab.proxy_log.exists():
            say("last lines of the proxy's log:")
            for text in lab.proxy_log.read_text(errors="replace").splitlines()[-20:]:
                say(f"  {text}")
        return 1
    finally:
        if lab is not None:
            say("\n== cleaning up: proxy stopped, namespaces removed")
            lab.close()


if __name__ == "__main__":
    sys.exit(main())
