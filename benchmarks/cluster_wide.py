"""Cluster-wide network programming: several nodes, one proxy each, one lab control plane.

Topology (every address in 198.18.0.0/15, every namespace created here):

    <prefix>cp  the API double, listening on 0.0.0.0 inside this namespace
      cpv<k> 198.18.250.<4k+1>/30 ---- kapi 198.18.250.<4k+2>/30  in node k's namespace

Each node is a full `lab.netns.Topology` of its own (node, client, routed pods, the
same addresses in every node, isolated from each other), with the real proxy in its
node namespace reaching the API over its own veth. Every node runs the same pods in the
same order, so an endpoint address is a real pod on every node and each node verifies a
change with its own packets, independently of the others.

Measured: `Config.nodes_point` services x endpoints on every node, then `CLUSTER_SERVICES`
single-endpoint services whose endpoint moves to the next port of a spare pod at
`Config.churn_rate` changes/s for `CLUSTER_SECONDS` (quick: `churn_seconds`). For each
(change, node) pair: API write -> that node forwards by the new rule (the echo reply
names the port, hence the generation). Next to it, clusterloader2's way: the
`kubeproxy_network_programming_duration_seconds` histograms of every node's proxy,
summed over the same window, read at p50/p90/p99 (upstream's SLO: p99 <= 30 s).

Threads: one writer thread; the main thread probes every node in turn.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import stats
from benchmarks.backends import Backend
from benchmarks.cluster import (
    SPARE_PODS,
    SPARE_PORTS,
    BenchLab,
    ProxyRun,
    add_service,
    keep_files,
    replace_slice,
)
from benchmarks.grid import Config
from benchmarks.progress import Progress
from benchmarks.results import ClusterResult
from benchmarks.scenarios import NPL, Generations, churn_slice, probe_round
from benchmarks.workload import (
    ECHO_PORT,
    NAMESPACE,
    REAL_PODS,
    ServiceSpec,
    endpoint_addresses,
    services,
    vip,
)
from lab.apiserver import ApiServer, write_kubeconfig
from lab.echo import start_echo
from lab.innetns import run_in_netns
from lab.netns import SERVICE_CIDR, Topology, cleanup_stale

CLUSTER_SERVICES = 10
CLUSTER_SECONDS = 30.0
LINK_NET = "198.18.250"
PREFIX = "cw"


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


class _Cluster:
    def __init__(self, nodes: int, real_pods: int) -> None:
        self.api = ApiServer(service_cidr=SERVICE_CIDR, bookmark_interval=60.0)
        self.labs: list[BenchLab] = []
        self.cp_ns = ""
        self.nodes = nodes
        self.real_pods = real_pods

    def build(self) -> None:
        cleanup_stale()
        first = Topology.create()
        self.cp_ns = f"{first.prefix}cp"  # swept with node 0's prefix after a crash
        subprocess.run(["ip", "netns", "add", self.cp_ns], check=True)
        _ip(self.cp_ns, "link", "set", "lo", "up")
        url = run_in_netns(self.cp_ns, lambda: self.api.start(host="0.0.0.0", port=0))
        port = url.rsplit(":", 1)[1]
        for k in range(self.nodes):
            topology = first if k == 0 else Topology.create()
            lab = BenchLab(
                topology,
                self.api,
                Path(tempfile.mkdtemp(prefix="kpy-bench-cw-")),
                endpoint_ips=[],
                spare=[],
                node_name=f"node-{k}",
            )
            self.labs.append(lab)
            cp_side, node_side = f"{LINK_NET}.{4 * k + 1}", f"{LINK_NET}.{4 * k + 2}"
            _ip(
                self.cp_ns,
                "link",
                "add",
                f"cpv{k}",
                "type",
                "veth",
                "peer",
                "name",
                "kapi",
                "netns",
                topology.node_ns,
            )
            _ip(self.cp_ns, "addr", "add", f"{cp_side}/30", "dev", f"cpv{k}")
            _ip(self.cp_ns, "link", "set", f"cpv{k}", "up")
            _ip(topology.node_ns, "addr", "add", f"{node_side}/30", "dev", "kapi")
            _ip(topology.node_ns, "link", "set", "kapi", "up")
            topology.run_in(topology.node_ns, ["ip", "route", "add", "unreachable", SERVICE_CIDR])
            write_kubeconfig(lab.kubeconfig, f"http://{cp_side}:{port}")
            for index in range(self.real_pods):
                pod = topology.add_pod(f"ep{index}")
                lab.endpoint_ips.append(pod.ip)
                lab.echoes.append(
                    start_echo(pod.netns, pod.name, tcp_ports=(ECHO_PORT,), udp_ports=())
                )
            for index in range(SPARE_PODS):
                pod = topology.add_pod(f"spare{index}")
                lab.spare.append((pod.name, pod.ip))
                lab.echoes.append(
                    start_echo(pod.netns, pod.name, tcp_ports=SPARE_PORTS, udp_ports=())
                )
        for lab in self.labs:
            for echo in lab.echoes:
                echo.wait_listening(timeout=60.0)

    def close(self, keep_logs: Path | None) -> None:
        for lab in self.labs:
            for echo in lab.echoes:
                echo.stop()
        self.api.stop()
        for lab in self.labs:
            with contextlib.suppress(Exception):
                lab.topology.destroy()
            keep_files(lab.workdir, keep_logs)
        if self.cp_ns:
            subprocess.run(["ip", "netns", "del", self.cp_ns], check=False)


def measure(
    config: Config, backend: Backend, progress: Progress, *, keep_logs: Path | None = None
) -> ClusterResult:
    point = config.nodes_point
    result = ClusterResult(config.nodes, point.services, point.endpoints)
    seconds = config.churn_seconds if config.quick else CLUSTER_SECONDS
    cluster = _Cluster(config.nodes, min(point.endpoints, REAL_PODS))
    runs: list[ProxyRun] = []
    try:
        progress.set(phase=f"building {config.nodes} nodes")
        cluster.build()
        labs = cluster.labs
        api = cluster.api
        api.create("namespaces", {"metadata": {"name": NAMESPACE}})
        for lab in labs:
            api.create(
                "nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": lab.node_name,
                        "labels": {"kubernetes.io/hostname": lab.node_name},
                    },
                    "status": {
                        "addresses": [{"type": "InternalIP", "address": lab.topology.node_ip}]
                    },
                },
            )
        specs = services(point.services, endpoint_addresses(labs[0].endpoint_ips, point.endpoints))
        progress.set(phase=f"populating the API ({point.services} services)")
        for spec in specs:
            add_service(labs[0], spec)
        first_vip = point.services + 1
        for index in range(CLUSTER_SERVICES):
            body = churn_slice(labs[0], index, 0, stamp=False, prefix="cw")
            add_service(labs[0], _spec(index, first_vip), body)
        expected = point.size + CLUSTER_SERVICES
        progress.set(phase=f"starting {config.nodes} proxies")
        for k, lab in enumerate(labs):
            runs.append(
                ProxyRun(
                    lab,
                    backend,
                    sync_period=config.sync_period,
                    min_sync_period=config.min_sync_period,
                    tag=f"{backend.name}-node{k}",
                )
            )
        end = time.monotonic() + config.deadline
        while not all("synced fully" in run.log_text() for run in runs):
            if time.monotonic() > end or not all(run.alive() for run in runs):
                result.status = "deadline" if all(r.alive() for r in runs) else "failed"
                result.detail = "not every node converged"
                return result
            time.sleep(0.1)
        for k, lab in enumerate(labs):
            found = backend.count(lab.save(backend))
            if found != expected:
                result.status = "failed"
                result.detail = f"node {k} programs {found} endpoints, expected {expected}"
                return result
        progress.set(phase=f"{config.churn_rate:g} changes/s for {seconds:g} s on every node")
        before = [stats.histogram(lab.metrics_text(), NPL) for lab in labs]
        gens = [Generations(first_vip, CLUSTER_SERVICES) for _ in labs]
        total = round(config.churn_rate * seconds)
        done = threading.Event()

        def writer() -> None:
            try:
                start = time.monotonic()
                for number in range(total):
                    time.sleep(max(0.0, start + number / config.churn_rate - time.monotonic()))
                    index = number % CLUSTER_SERVICES
                    generation = gens[0].written[index] + 1
                    body = churn_slice(labs[0], index, generation, stamp=True, prefix="cw")
                    written = time.monotonic()
                    replace_slice(labs[0], body)
                    for g in gens:
                        g.record(index, generation, written)
            finally:
                done.set()

        thread = threading.Thread(target=writer, name="cluster-writer", daemon=True)
        thread.start()
        finished_writing: float | None = None
        while True:
            for lab, g in zip(labs, gens, strict=True):
                probe_round(lab, g)
            if done.is_set():
                finished_writing = finished_writing or time.monotonic()
                waiting = any(g.waiting() for g in gens)
                if not waiting or time.monotonic() - finished_writing > 60.0:
                    break
            if not all(run.alive() for run in runs):
                result.status, result.detail = "failed", "a proxy exited"
                return result
            time.sleep(0.002)
        thread.join()
        time.sleep(0.5)
        result.changes = total * len(labs)
        result.latencies = [lat for g in gens for lat in g.latencies]
        result.lost = sum(len(q) for g in gens for q in g.pending)
        merged: dict[float, float] = {}
        for lab, old in zip(labs, before, strict=True):
            delta = stats.histogram_delta(stats.histogram(lab.metrics_text(), NPL), old)
            for bound, count in delta.items():
                merged[bound] = merged.get(bound, 0.0) + count
        result.proxy_histogram = {
            "count": max(merged.values(), default=0.0),
            "p50": stats.histogram_quantile(merged, 0.5),
            "p90": stats.histogram_quantile(merged, 0.9),
            "p99": stats.histogram_quantile(merged, 0.99),
        }
        summary = stats.summary(result.latencies)
        figures = "/".join(f"{summary[q] or 0:.3f}" for q in ("p50", "p90", "p99"))
        progress.result(
            f"{backend.name} {config.nodes} nodes x {point.label}: {result.changes} (change, node)"
            f" pairs, {result.lost} lost, p50/p90/p99 {figures} s; proxies' histogram p99 "
            f"{result.proxy_histogram['p99'] or 0:.3f} s"
        )
        return result
    finally:
        for run in runs:
            run.stop()
        cluster.close(keep_logs)


def _spec(index: int, first_vip: int) -> ServiceSpec:
    return ServiceSpec(f"cw{index}", vip(first_vip + index), ())
