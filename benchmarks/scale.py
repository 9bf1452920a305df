"""The real proxy against the lab API at scale: convergence, one-change latency, memory.

    .venv/bin/python -m benchmarks.scale [--services 10000] [--endpoints 10]
        [--variant legacy|nft] [--changes 50] [--sync-period 30] [--json PATH]

Run as root (network namespaces). What it does, all inside namespaces it creates on
198.18.0.0/15, removed at the end:

1. A lab node with `--endpoints + 2` pods running echo servers, and the lab's
   Kubernetes API double (in this process, listening in the node namespace) holding
   `--services` ClusterIP Services whose EndpointSlices each list the same
   `--endpoints` real pods, so every VIP of the cluster answers, plus one "probe"
   Service with a single endpoint that the change loop moves between two spare pods.
2. The real `python -m proxy` in the node namespace (`KPY_IPTABLES_MODE=--variant`).
   First convergence is the time from starting the process to the commit of its first
   full sync (its `kubeproxy_sync_proxy_rules_last_timestamp_seconds`), verified by
   reading the kernel back (one KPY-SEP chain per endpoint) and by real connections
   to a sample of VIPs.
3. The same final ruleset, saved with `iptables-save`, is restored by the raw tool
   into a fresh namespace in the same run: the ratio of our first convergence to that
   restore is the figure that travels between machines.
4. `--changes` times, the probe Service's endpoint moves to the other spare pod
   (an EndpointSlice write stamped with `last-change-trigger-time`), and a TCP client
   outside the cluster connects to its VIP until the new pod answers: API write ->
   new endpoint answers. The next change comes 1.2-2.4 s after one is seen (past the
   default min sync period, so each change is measured alone), so 50 changes span
   more than two sync periods and periodic ticks happen in between. Reported as
   p50/p99/max, next to the proxy's own `kubeproxy_network_programming_duration_seconds`
   for the same changes.
5. The proxy's RSS (steady after convergence, and its peak), its CPU seconds to
   converge, and where a sync's time went (its per-phase histogram).

Nothing here is a pass/fail test: it prints a table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.apiserver import ApiServer, write_kubeconfig
from lab.echo import EchoServer, start_echo
from lab.innetns import run_in_netns
from lab.netns import CLUSTER_CIDR, SERVICE_CIDR, Topology, cleanup_stale
from lab.probe import EchoReply, probe
from lab.slicewriter import rfc3339_nano

NODE_NAME = "bench-node"
NAMESPACE = "bench"
ECHO_PORT = 8080
METRICS_PORT = 10249
HEALTHZ_PORT = 10256
REPO = Path(__file__).resolve().parents[1]
PROBE_SERVICE = "probe"
CONVERGE_DEADLINE = 900.0
"""Seconds a first convergence may take before the run is reported as failed."""
CHANGE_DEADLINE = 60.0
"""Seconds one change may take to be seen before it counts as lost."""


@dataclass
class Result:
    """Everything one run measured (seconds, MiB)."""

    services: int
    endpoints: int
    variant: str
    sync_period: float
    first_convergence: float = 0.0
    """The median over the repetitions."""
    convergence_breakdown: dict[str, float] = field(default_factory=dict)
    raw_restore: float = 0.0
    """The median over the repetitions."""
    ratio: float = 0.0
    """The median of the per-repetition ratios (each: our convergence / the raw restore
    timed right after it)."""
    repetitions: list[dict[str, float]] = field(default_factory=list)
    ruleset_bytes: int = 0
    sep_chains: int = 0
    vips_probed: int = 0
    vips_answering: int = 0
    change_latencies: list[float] = field(default_factory=list)
    changes_lost: int = 0
    change_span_periods: float = 0.0
    """How many sync periods the changes spanned."""
    full_syncs_during_changes: int = 0
    partial_syncs_during_changes: int = 0
    network_programming_mean: float = 0.0
    rss_steady_mib: float = 0.0
    rss_peak_mib: float = 0.0
    cpu_to_converge: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        values = sorted(self.change_latencies)
        if not values:
            return float("nan")
        index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
        return values[index]


# -- the cluster ------------------------------------------------------------------------


@dataclass
class ScaleLab:
    topology: Topology
    api: ApiServer
    workdir: Path
    echoes: list[EchoServer] = field(default_factory=list)
    proxy: subprocess.Popen[bytes] | None = None

    def pod_ip(self, index: int) -> str:
        return self.topology.pods[f"pod{index}"].ip

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        return run_in_netns(self.topology.node_ns, fetch)

    def close(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(20)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        for echo in self.echoes:
            echo.stop()
        self.api.stop()
        self.topology.destroy()


@contextmanager
def scale_lab(pods: int) -> Iterator[ScaleLab]:
    cleanup_stale()
    topology = Topology.create(pods=pods)
    api = ApiServer(service_cidr=SERVICE_CIDR, bookmark_interval=60.0)
    lab = ScaleLab(topology, api, Path(tempfile.mkdtemp(prefix="kpy-bench-")))
    try:
        url = run_in_netns(topology.node_ns, lambda: api.start(host="127.0.0.1", port=0))
        write_kubeconfig(lab.workdir / "kubeconfig", url)
        for index in range(pods):
            name = f"pod{index}"
            echo = start_echo(topology.pods[name].netns, name, tcp_ports=(ECHO_PORT,), udp_ports=())
            lab.echoes.append(echo)
        for echo in lab.echoes:
            echo.wait_listening()
        yield lab
    finally:
        lab.close()


def vip(index: int) -> str:
    """The index-th address of the service CIDR, skipping .0 and .255 of each /24."""
    return f"198.19.{index // 254}.{index % 254 + 1}"


def service(name: str, cluster_ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "targetPort": ECHO_PORT, "protocol": "TCP"}],
        },
    }


def endpoint_slice(name: str, ips: list[str], trigger: float | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"{name}-bench",
        "namespace": NAMESPACE,
        "labels": {"kubernetes.io/service-name": name},
    }
    if trigger is not None:
        stamp = rfc3339_nano(trigger)
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": stamp}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": ECHO_PORT, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE_NAME} for ip in ips
        ],
    }


def populate(lab: ScaleLab, services: int, endpoints: int) -> None:
    api = lab.api
    api.create("namespaces", {"metadata": {"name": NAMESPACE}})
    api.create(
        "nodes",
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
            "status": {"addresses": [{"type": "InternalIP", "address": lab.topology.node_ip}]},
        },
    )
    ips = [lab.pod_ip(i) for i in range(endpoints)]
    for index in range(services):
        name = f"svc{index}"
        api.create("services", service(name, vip(index)), namespace=NAMESPACE)
        api.create("endpointslices", endpoint_slice(name, ips), namespace=NAMESPACE)
    api.create("services", service(PROBE_SERVICE, vip(services)), namespace=NAMESPACE)
    api.create(
        "endpointslices",
        endpoint_slice(PROBE_SERVICE, [lab.pod_ip(endpoints)]),
        namespace=NAMESPACE,
    )


# -- the proxy --------------------------------------------------------------------------


def start_proxy(lab: ScaleLab, variant: str, sync_period: float) -> float:
    """Start `python -m proxy`; returns the wall time just before the process starts."""
    argv = [
        "ip",
        "netns",
        "exec",
        lab.topology.node_ns,
        sys.executable,
        "-m",
        "proxy",
        f"--kubeconfig={lab.workdir / 'kubeconfig'}",
        f"--hostname-override={NODE_NAME}",
        "--proxy-mode=iptables",
        f"--cluster-cidr={CLUSTER_CIDR}",
        f"--metrics-bind-address=127.0.0.1:{METRICS_PORT}",
        f"--healthz-bind-address=127.0.0.1:{HEALTHZ_PORT}",
        f"--iptables-sync-period={sync_period:g}s",
        "-v=4",
    ]
    env = {**os.environ, "KPY_IPTABLES_MODE": variant, "PYTHONPATH": str(REPO)}
    log = open(lab.workdir / "proxy.log", "wb")  # noqa: SIM115 (lives as long as the process)
    started = time.time()
    lab.proxy = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=REPO
    )
    return started


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from an exposition (0 when absent).

    Without `labels`, the sum over every label set of `name` (upstream's sync metrics
    carry `ip_family`; one family here, so the sum is that family's value).
    """
    if labels:
        pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.MULTILINE)
        match = pattern.search(text)
        return float(match.group(1)) if match else 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def wait_for(check: Callable[[], bool], deadline: float, what: str, step: float = 0.05) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(step)
    raise TimeoutError(f"{what} did not happen within {deadline:.0f} s")


def proc_status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def proxy_pid(lab: ScaleLab) -> int:
    """The python process under `ip netns exec` (exec replaces it, so the same pid)."""
    assert lab.proxy is not None
    return lab.proxy.pid


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / ticks


def breakdown(log_path: Path, started: float) -> dict[str, float]:
    """Seconds from the process start to milestones the proxy logs."""
    marks = {
        "started": "proxy started",
        "services listed": "services: listed",
        "slices listed": "endpointslices: listed",
        "first sync done": "synced fully",
    }
    found: dict[str, float] = {}
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
    for line in log_path.read_text(errors="replace").splitlines():
        match = stamp.match(line)
        if not match:
            continue
        for key, needle in marks.items():
            if key not in found and needle in line:
                when = time.mktime(time.strptime(match.group(1)[:19], "%Y-%m-%d %H:%M:%S"))
                when += int(match.group(1)[20:]) / 1000
                found[key] = round(when - started, 3)
    return found


# -- measurements -----------------------------------------------------------------------


def stop_proxy(lab: ScaleLab) -> None:
    """SIGTERM the proxy (its rules stay), then remove them with `--cleanup`."""
    assert lab.proxy is not None
    lab.proxy.terminate()
    lab.proxy.wait(30)
    lab.proxy = None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        ["ip", "netns", "exec", lab.topology.node_ns, sys.executable, "-m", "proxy", "--cleanup"],
        check=True,
        capture_output=True,
        env=env,
        cwd=REPO,
    )


def measure_convergence(lab: ScaleLab, result: Result) -> float:
    """Start the proxy on a node without our rules; seconds until its first full sync.

    Waiting watches the proxy's log file, not its /metrics: a scrape every 100 ms takes
    the GIL from the sync it is timing (each renders every metric), so the metrics are
    read once, after the "synced fully" line appeared, for the commit's timestamp.
    """
    started = start_proxy(lab, result.variant, result.sync_period)
    pid = proxy_pid(lab)
    log_path = lab.workdir / "proxy.log"

    def synced() -> bool:
        if lab.proxy is not None and lab.proxy.poll() is not None:
            raise RuntimeError(f"the proxy exited; see {log_path}")
        return "synced fully" in log_path.read_text(errors="replace")

    wait_for(synced, CONVERGE_DEADLINE, "the first full sync", step=0.05)
    result.cpu_to_converge = cpu_seconds(pid)
    result.convergence_breakdown = breakdown(log_path, started)
    last_sync = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
    committed = [0.0]

    def stamped() -> bool:  # set just after the log line
        committed[0] = metric(lab.metrics(), last_sync)
        return committed[0] > 0

    wait_for(stamped, 10.0, "the sync timestamp", step=0.01)
    return committed[0] - started


def verify_kernel(lab: ScaleLab, result: Result, sample: int = 200) -> str:
    """Read the rules back and probe a sample of VIPs; returns the saved ruleset."""
    saved = lab.topology.run_in(lab.topology.node_ns, [f"iptables-{result.variant}-save"]).stdout
    result.ruleset_bytes = len(saved)
    result.sep_chains = saved.count("\n:KPY-SEP-")
    indexes = random.sample(range(result.services), min(sample, result.services))
    answering = 0
    for index in indexes:
        reply = probe(lab.topology.client_ns, vip(index), 80, "tcp", timeout=2.0)
        answering += isinstance(reply, EchoReply)
    result.vips_probed, result.vips_answering = len(indexes), answering
    return saved


def measure_raw_restore(lab: ScaleLab, result: Result, saved: str) -> float:
    """Time the raw tool restoring the same ruleset into an empty namespace."""
    netns = f"{lab.topology.prefix}raw"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        began = time.perf_counter()
        done = subprocess.run(
            ["ip", "netns", "exec", netns, f"iptables-{result.variant}-restore", "-w", "5"],
            input=saved,
            text=True,
            capture_output=True,
            check=False,
        )
        elapsed = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(f"raw restore failed: {done.stderr[:500]}")
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    return elapsed


def measure_changes(lab: ScaleLab, result: Result, changes: int) -> None:
    """Move the probe Service's endpoint `changes` times; time API write -> new pod answers."""
    spare = [lab.pod_ip(result.endpoints), lab.pod_ip(result.endpoints + 1)]
    names = {lab.pod_ip(result.endpoints): f"pod{result.endpoints}"}
    names[lab.pod_ip(result.endpoints + 1)] = f"pod{result.endpoints + 1}"
    target_vip = vip(result.services)
    # Each change is measured on its own: the next one comes 1.2-2.4 s after the last was
    # seen, past the default --iptables-min-sync-period (1 s), which would otherwise be
    # what is measured. 50 changes span at least two 30 s sync periods.
    before = lab.metrics()
    client = lab.topology.client_ns
    began = time.monotonic()
    for number in range(changes):
        ip = spare[(number + 1) % 2]
        current = lab.api.get("endpointslices", f"{PROBE_SERVICE}-bench", namespace=NAMESPACE)
        body = endpoint_slice(PROBE_SERVICE, [ip], trigger=time.time())
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        written = time.monotonic()
        lab.api.update("endpointslices", body, namespace=NAMESPACE)
        seen = None
        while time.monotonic() - written < CHANGE_DEADLINE:
            reply = probe(client, target_vip, 80, "tcp", timeout=0.5)
            if isinstance(reply, EchoReply) and reply.pod == names[ip]:
                seen = time.monotonic()
                break
            time.sleep(0.002)
        if seen is None:
            result.changes_lost += 1
        else:
            result.change_latencies.append(seen - written)
        time.sleep(random.uniform(1.2, 2.4))
    result.change_span_periods = (time.monotonic() - began) / result.sync_period
    after = lab.metrics()
    full = "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
    partial = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
    result.full_syncs_during_changes = int(metric(after, full) - metric(before, full))
    result.partial_syncs_during_changes = int(metric(after, partial) - metric(before, partial))
    npl = "kubeproxy_network_programming_duration_seconds"
    count = metric(after, f"{npl}_count") - metric(before, f"{npl}_count")
    total = metric(after, f"{npl}_sum") - metric(before, f"{npl}_sum")
    result.network_programming_mean = total / count if count else float("nan")
    phase = "kubeproxy_py_sync_phase_duration_seconds"
    result.phases = {
        name: round(metric(after, f"{phase}_sum", f'{{phase="{name}"}}'), 3)
        for name in ("render", "read", "write")
    }


def measure_memory(lab: ScaleLab, result: Result) -> None:
    status = proc_status(proxy_pid(lab))
    result.rss_steady_mib = int(status["VmRSS"].split()[0]) / 1024
    result.rss_peak_mib = int(status["VmHWM"].split()[0]) / 1024


# -- report -----------------------------------------------------------------------------


def report(result: Result) -> str:
    lat = result.change_latencies
    rows = [
        ("scale", f"{result.services} services x {result.endpoints} endpoints, {result.variant}"),
        ("first convergence (median)", f"{result.first_convergence:.2f} s"),
        ("  milestones, last run (s)", json.dumps(result.convergence_breakdown)),
        ("raw restore, same ruleset (median)", f"{result.raw_restore:.2f} s"),
        ("ratio ours / raw (median)", f"{result.ratio:.2f}"),
        (
            "  per run: ours / raw",
            ", ".join(
                f"{run['ours']:.2f}/{run['raw']:.2f}={run['ratio']:.2f}"
                for run in result.repetitions
            ),
        ),
        ("ruleset", f"{result.ruleset_bytes / 1e6:.1f} MB, {result.sep_chains} KPY-SEP chains"),
        ("VIPs answering (sample)", f"{result.vips_answering}/{result.vips_probed}"),
        (
            "one change, API write -> answers",
            f"p50 {result.percentile(0.5) * 1000:.0f} ms, p99 {result.percentile(0.99) * 1000:.0f}"
            f" ms, max {max(lat, default=float('nan')) * 1000:.0f} ms over {len(lat)} changes"
            f" ({result.changes_lost} lost) spanning {result.change_span_periods:.1f} sync periods",
        ),
        (
            "syncs during the changes",
            f"{result.partial_syncs_during_changes} partial, "
            f"{result.full_syncs_during_changes} full",
        ),
        ("proxy's network programming mean", f"{result.network_programming_mean * 1000:.0f} ms"),
        ("RSS steady / peak", f"{result.rss_steady_mib:.0f} / {result.rss_peak_mib:.0f} MiB"),
        ("CPU to converge", f"{result.cpu_to_converge:.1f} s"),
        ("sync phases (sum, s)", json.dumps(result.phases)),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--variant", choices=("legacy", "nft"), default="legacy")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--sync-period", type=float, default=30.0)
    parser.add_argument(
        "--repeat", type=int, default=3, help="convergences measured (median reported)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the benchmark builds network namespaces")
    result = Result(args.services, args.endpoints, args.variant, args.sync_period)
    with scale_lab(args.endpoints + 2) as lab:
        print(f"populating the API with {args.services} services ...", flush=True)
        populate(lab, args.services, args.endpoints)
        saved = ""
        for run in range(args.repeat):
            if run:
                stop_proxy(lab)
            print(f"starting the proxy (run {run + 1} of {args.repeat}) ...", flush=True)
            ours = measure_convergence(lab, result)
            if not saved:
                time.sleep(3)
                measure_memory(lab, result)
                saved = verify_kernel(lab, result)
            raw = measure_raw_restore(lab, result, saved)
            result.repetitions.append({"ours": ours, "raw": raw, "ratio": ours / raw})
            print(f"  converged in {ours:.2f} s; the raw restore took {raw:.2f} s", flush=True)
        result.first_convergence = statistics.median(r["ours"] for r in result.repetitions)
        result.raw_restore = statistics.median(r["raw"] for r in result.repetitions)
        result.ratio = statistics.median(r["ratio"] for r in result.repetitions)
        print(f"moving an endpoint {args.changes} times ...", flush=True)
        measure_changes(lab, result, args.changes)
        status = proc_status(proxy_pid(lab))
        result.rss_peak_mib = int(status["VmHWM"].split()[0]) / 1024
        print(report(result))
        if args.json:
            args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
