"""The lab cluster driver: namespaces, pods, the API double and the real proxy process.

One `BenchLab` is one node of a grid point: a `lab.netns.Topology` (node, client and
routed pod namespaces on 198.18.0.0/15), echo servers in the pods, and the lab's
Kubernetes API double running on threads of this process but listening inside the node
namespace, where the proxy reaches it through a kubeconfig. Endpoint pods answer on the
echo port; the spare pods (where probe, churn and burst changes move endpoints) answer
on `SPARE_PORTS` ports each, so a reply names the exact generation of a change (its
port), not just a pod.

`ProxyRun` is one `python -m proxy` process in the node namespace for one backend, its
log in the lab's work directory, and `ResourceSampler` a thread that follows its RSS
and the peak RSS of the tools it spawns (a sampled lower bound: a tool that lives less
than one sampling period may be missed).

Concurrency: one thread drives a lab. The API server has its own threads; the sampler
only reads /proc. Teardown (`close`) stops the proxy (leaving no rules: `--cleanup`),
the echo servers and the API server, and deletes every namespace; a crashed earlier run
is swept by `lab.netns.cleanup_stale` at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.backends import Backend
from benchmarks.workload import ECHO_PORT, NAMESPACE, ServiceSpec, service_body, spec_slice
from lab.apiserver import ApiServer, write_kubeconfig
from lab.echo import EchoServer, start_echo
from lab.innetns import run_in_netns
from lab.netns import CLUSTER_CIDR, SERVICE_CIDR, Topology, cleanup_stale

NODE_NAME = "bench-node"
METRICS_PORT = 10249
HEALTHZ_PORT = 10256
SPARE_PODS = 3
SPARE_PORTS = tuple(range(9000, 9064))
"""Ports every spare pod answers on: a change moves an endpoint to the next one."""
REPO = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGTERM it when the harness dies."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class BenchLab:
    """A node, its pods and the API; build with `bench_lab()`."""

    topology: Topology
    api: ApiServer
    workdir: Path
    endpoint_ips: list[str]
    """Pods answering on ECHO_PORT, in order (the real endpoints of every service)."""
    spare: list[tuple[str, str]]
    """(pod name, ip) of the spare pods answering on SPARE_PORTS."""
    echoes: list[EchoServer] = field(default_factory=list)
    node_name: str = NODE_NAME

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def metrics_text(self) -> str:
        """The proxy's /metrics exposition (fetched inside the node namespace)."""

        def fetch() -> str:
            url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                return str(response.read().decode())

        return run_in_netns(self.topology.node_ns, fetch)

    def save(self, backend: Backend) -> str:
        """Read the kernel back in the node namespace with the backend's save tool."""
        return self.topology.run_in(self.topology.node_ns, list(backend.save)).stdout

    def close(self, keep_logs: Path | None = None) -> None:
        """Stop everything; move the proxy logs to `keep_logs` (or drop them)."""
        for echo in self.echoes:
            echo.stop()
        self.api.stop()
        self.topology.destroy()
        keep_files(self.workdir, keep_logs)


def keep_files(workdir: Path, keep_logs: Path | None) -> None:
    """Move the logs of a work directory to `keep_logs`, then remove it."""
    if keep_logs is not None:
        keep_logs.mkdir(parents=True, exist_ok=True)
        for log in workdir.glob("*.log"):
            shutil.move(log, keep_logs / log.name)
    shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def bench_lab(
    real_pods: int, *, spare_pods: int = SPARE_PODS, keep_logs: Path | None = None
) -> Iterator[BenchLab]:
    """A node with `real_pods` endpoint pods and `spare_pods` spare pods, all answering.

    At the end the proxy logs move to `keep_logs` (when given) and the rest goes.
    """
    cleanup_stale()
    topology = Topology.create()
    api = ApiServer(service_cidr=SERVICE_CIDR, bookmark_interval=60.0)
    workdir = Path(tempfile.mkdtemp(prefix="kpy-bench-"))
    lab = BenchLab(topology, api, workdir, endpoint_ips=[], spare=[])
    try:
        # A VIP with no rules yet (a service being added) is unreachable at once, rather
        # than looping between node and client until its TTL runs out: the probe of an
        # added service then fails in microseconds and tries again, instead of timing out.
        topology.run_in(topology.node_ns, ["ip", "route", "add", "unreachable", SERVICE_CIDR])
        url = run_in_netns(topology.node_ns, lambda: api.start(host="127.0.0.1", port=0))
        write_kubeconfig(lab.kubeconfig, url)
        for index in range(real_pods):
            pod = topology.add_pod(f"ep{index}")
            lab.endpoint_ips.append(pod.ip)
            lab.echoes.append(start_echo(pod.netns, pod.name, tcp_ports=(ECHO_PORT,), udp_ports=()))
        for index in range(spare_pods):
            pod = topology.add_pod(f"spare{index}")
            lab.spare.append((pod.name, pod.ip))
            lab.echoes.append(start_echo(pod.netns, pod.name, tcp_ports=SPARE_PORTS, udp_ports=()))
        for echo in lab.echoes:
            echo.wait_listening(timeout=60.0)
        yield lab
    finally:
        lab.close(keep_logs)


def populate(lab: BenchLab, specs: Sequence[ServiceSpec]) -> None:
    """The namespace, this node, then every Service with its EndpointSlice."""
    api = lab.api
    api.create("namespaces", {"metadata": {"name": NAMESPACE}})
    api.create(
        "nodes",
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": lab.node_name,
                "labels": {"kubernetes.io/hostname": lab.node_name},
            },
            "status": {"addresses": [{"type": "InternalIP", "address": lab.topology.node_ip}]},
        },
    )
    for spec in specs:
        add_service(lab, spec)


def add_service(lab: BenchLab, spec: ServiceSpec, slice_doc: dict[str, Any] | None = None) -> None:
    lab.api.create("services", service_body(spec), namespace=NAMESPACE)
    body = slice_doc if slice_doc is not None else spec_slice(spec, node=lab.node_name)
    lab.api.create("endpointslices", body, namespace=NAMESPACE)


def replace_slice(lab: BenchLab, body: dict[str, Any]) -> None:
    """Write a new version of an existing EndpointSlice (the API double checks the version)."""
    name = body["metadata"]["name"]
    current = lab.api.get("endpointslices", name, namespace=NAMESPACE)
    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    lab.api.update("endpointslices", body, namespace=NAMESPACE)


def delete_service(lab: BenchLab, name: str) -> None:
    lab.api.delete("endpointslices", f"{name}-bench", namespace=NAMESPACE)
    lab.api.delete("services", name, namespace=NAMESPACE)


# -- /proc ------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of a process, MiB."""
    return int(proc_status(pid)[key].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            found.extend(int(word) for word in text.split())
    return found


class ResourceSampler:
    """Samples a process's RSS and its children's peak RSS every `period` s, on a thread."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        self.pid = pid
        self.period = period
        self.tool_peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for child in children(self.pid):
                with contextlib.suppress(OSError, KeyError, ValueError):
                    self.tool_peak_mib = max(self.tool_peak_mib, rss_mib(child, "VmHWM"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the proxy --------------------------------------------------------------------------


class ProxyRun:
    """One `python -m proxy` process for one backend in the lab's node namespace."""

    def __init__(
        self,
        lab: BenchLab,
        backend: Backend,
        *,
        sync_period: float,
        min_sync_period: float,
        tag: str,
    ) -> None:
        self.lab = lab
        self.backend = backend
        self.log_path = lab.workdir / f"proxy-{tag}.log"
        argv = [
            "ip",
            "netns",
            "exec",
            lab.topology.node_ns,
            sys.executable,
            "-m",
            "proxy",
            f"--kubeconfig={lab.kubeconfig}",
            f"--hostname-override={lab.node_name}",
            f"--proxy-mode={backend.proxy_mode}",
            f"--cluster-cidr={CLUSTER_CIDR}",
            f"--metrics-bind-address=127.0.0.1:{METRICS_PORT}",
            f"--healthz-bind-address=127.0.0.1:{HEALTHZ_PORT}",
            f"--iptables-sync-period={sync_period:g}s",
            f"--iptables-min-sync-period={min_sync_period:g}s",
            "-v=4",
        ]
        env = {**os.environ, **backend.env, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "wb") as log:
            self.started = time.time()
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=REPO,
                preexec_fn=_die_with_parent,  # noqa: PLW1509  (no threads touch the child)
            )
        # `ip netns exec` execs the interpreter: the same pid is the proxy.
        self.pid = self.process.pid
        self.sampler = ResourceSampler(self.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (the proxy leaves its rules), then `--cleanup` removes them."""
        self.sampler.stop()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        env = {**os.environ, **self.backend.env, "PYTHONPATH": str(REPO)}
        argv = [
            "ip",
            "netns",
            "exec",
            self.lab.topology.node_ns,
            sys.executable,
            "-m",
            "proxy",
            f"--proxy-mode={self.backend.proxy_mode}",
            "--cleanup",
        ]
        subprocess.run(argv, capture_output=True, env=env, cwd=REPO, check=False, timeout=600)


LISTED_SERVICES = "services: listed"
LISTED_SLICES = "endpointslices.discovery.k8s.io: listed"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_milestones(text: str, started: float) -> dict[str, float]:
    """Seconds from the process start to the milestones the proxy logs (first of each)."""
    marks = {
        "started": "proxy started",
        "services listed": LISTED_SERVICES,
        "slices listed": LISTED_SLICES,
        "first sync done": "synced fully",
    }
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = _STAMP.match(line)
        if not match:
            continue
        for key, needle in marks.items():
            if key not in found and needle in line:
                when = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
                found[key] = round(when + int(match.group(2)) / 1000 - started, 3)
    return found


def metric(
    text: str, name: str, labels: str = "", combine: Callable[[list[float]], float] = sum
) -> float:
    """One sample's value from an exposition (0 when absent).

    Without `labels`, `combine` (sum: counts; max: timestamps) over every label set of
    `name`: upstream's sync metrics carry `ip_family`, and a node with IPv6 runs one
    backend per family even when every service here is IPv4.
    """
    if labels:
        pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.MULTILINE)
        match = pattern.search(text)
        return float(match.group(1)) if match else 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    values = [float(value) for value in pattern.findall(text)]
    return combine(values) if values else 0.0
