"""A one-node lab cluster: the API double, pods with echo servers, and the real proxy.

`LabCluster` is what both `python -m lab` and the end-to-end tests drive:

- a `Topology` of network namespaces (node, client, routed pods; see `netns`);
- the Kubernetes API double (`apiserver`), running on threads of this process but
  listening *inside the node namespace* on 127.0.0.1, where the proxy finds it
  through a kubeconfig, like a kubelet-hosted control plane;
- a `SliceWriter` that keeps EndpointSlices in step with the lab's pods and Services
  (it follows Service changes itself) and stamps
  `endpoints.kubernetes.io/last-change-trigger-time`;
- the real `python -m proxy` process in the node namespace, with kube-proxy's flags;
  it gets PR_SET_PDEATHSIG so it dies with us even if we are SIGKILLed, and its log
  goes to a file we can show.

Teardown (`close`) stops the proxy, the echo servers and the API server and deletes
every namespace; a crashed earlier run is cleaned by `netns.cleanup_stale` at start.

Concurrency: one thread drives a `LabCluster`; the API server has its own threads.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.apiserver import ApiServer, write_kubeconfig
from lab.echo import EchoServer, start_echo
from lab.innetns import run_in_netns
from lab.netns import (
    CLUSTER_CIDR,
    CLUSTER_CIDR6,
    SERVICE_CIDR,
    SERVICE_CIDR6,
    Topology,
    cleanup_stale,
)
from lab.slicewriter import LabPod, SliceWriter

NODE_NAME = "lab-node"
NAMESPACE = "default"
ECHO_TCP_PORT = 8080
ECHO_UDP_PORT = 5353
METRICS_PORT = 10249
HEALTHZ_PORT = 10256
_PR_SET_PDEATHSIG = 1
_REPO_ROOT = Path(__file__).resolve().parents[1]


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the lab process dies."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class LabCluster:
    """A running lab; build it with `LabCluster.start()` and always `close()` it."""

    topology: Topology
    api: ApiServer
    api_url: str
    writer: SliceWriter
    workdir: Path
    echo: dict[str, EchoServer] = field(default_factory=dict)
    proxy: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def start(cls, *, bookmark_interval: float = 60.0) -> LabCluster:
        """Clean leftovers, build the namespaces, start the API server, register the Node."""
        cleanup_stale()
        topology = Topology.create()
        try:
            # Dual-stack, IPv4 first: a Service is IPv4-only unless it asks for both.
            api = ApiServer(
                service_cidr=f"{SERVICE_CIDR},{SERVICE_CIDR6}", bookmark_interval=bookmark_interval
            )
            url = run_in_netns(topology.node_ns, lambda: api.start(host="127.0.0.1", port=0))
            workdir = Path(tempfile.mkdtemp(prefix=f"{topology.prefix}lab-"))
            write_kubeconfig(workdir / "kubeconfig", url)
            lab = cls(topology, api, url, SliceWriter(api), workdir)
        except BaseException:
            topology.destroy()
            raise
        lab.api.create(
            "nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": topology.node_ip},
                        {"type": "InternalIP", "address": topology.node_ip6},
                    ]
                },
            },
        )
        return lab

    def restart_api(self) -> str:
        """Start the stopped API server again on the same address (inside the node namespace)."""
        self.api_url = run_in_netns(self.topology.node_ns, self.api.restart)
        return self.api_url

    def close(self) -> None:
        """Stop everything and delete the namespaces; safe to call twice."""
        self.stop_proxy()
        for server in self.echo.values():
            server.stop()
        self.echo.clear()
        self.api.stop()
        self.topology.destroy()

    def __enter__(self) -> LabCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- pods and services ---------------------------------------------------------------

    def add_pod(self, name: str, labels: Mapping[str, str], *, ready: bool = True) -> LabPod:
        """A pod namespace with an echo server (TCP 8080, UDP 5353), known to the slices."""
        pod_net = self.topology.add_pod(name)
        server = start_echo(
            pod_net.netns,
            name,
            tcp_ports=(ECHO_TCP_PORT,),
            udp_ports=(ECHO_UDP_PORT,),
            log_path=self.workdir / f"echo-{name}.log",
        )
        server.wait_listening()
        self.echo[name] = server
        pod = LabPod(
            name=name,
            namespace=NAMESPACE,
            ip=pod_net.ip,
            ip6=pod_net.ip6,
            node_name=NODE_NAME,
            labels=dict(labels),
            ready=ready,
            terminating=False,
            container_ports={"http": (ECHO_TCP_PORT, "TCP"), "dns": (ECHO_UDP_PORT, "UDP")},
        )
        self.writer.set_pod(pod)
        return pod

    def remove_pod(self, name: str) -> None:
        """Take the pod out of its slices first, then stop it and delete its namespace."""
        self.writer.remove_pod(name, NAMESPACE)
        server = self.echo.pop(name, None)
        if server is not None:
            server.stop()
        self.topology.remove_pod(name)

    def create_service(
        self,
        name: str,
        selector: Mapping[str, str],
        ports: Sequence[Mapping[str, Any]],
        *,
        service_type: str = "ClusterIP",
        dual_stack: bool = False,
    ) -> dict[str, Any]:
        """Create a Service through the API (it allocates the ClusterIPs and NodePorts);
        `dual_stack` asks for an IPv4 and an IPv6 ClusterIP (RequireDualStack)."""
        spec: dict[str, Any] = {
            "type": service_type,
            "selector": dict(selector),
            "ports": list(ports),
        }
        if dual_stack:
            spec["ipFamilyPolicy"] = "RequireDualStack"
            spec["ipFamilies"] = ["IPv4", "IPv6"]
        return self.api.create(
            "services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": spec,
            },
            namespace=NAMESPACE,
        )

    def delete_service(self, name: str) -> None:
        self.api.delete("services", name, namespace=NAMESPACE)

    # -- the proxy -----------------------------------------------------------------------

    @property
    def proxy_log(self) -> Path:
        return self.workdir / "proxy.log"

    def start_proxy(self, *extra_args: str) -> None:
        """Run the real `python -m proxy` in the node namespace with kube-proxy's flags."""
        argv = [
            "ip",
            "netns",
            "exec",
            self.topology.node_ns,
            sys.executable,
            "-m",
            "proxy",
            f"--kubeconfig={self.workdir / 'kubeconfig'}",
            f"--hostname-override={NODE_NAME}",
            "--proxy-mode=iptables",
            f"--cluster-cidr={CLUSTER_CIDR},{CLUSTER_CIDR6}",
            f"--metrics-bind-address=127.0.0.1:{METRICS_PORT}",
            f"--healthz-bind-address=127.0.0.1:{HEALTHZ_PORT}",
            *extra_args,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        with open(self.proxy_log, "wb") as log:  # one log per proxy run
            self.proxy = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=_die_with_parent,  # noqa: PLW1509  (no threads touch the child)
            )

    def stop_proxy(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the proxy (it leaves its rules in place) and reap it."""
        if self.proxy is None:
            return None
        if self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
        code = self.proxy.wait(timeout)
        self.proxy = None
        return code

    def http_get(self, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET http://127.0.0.1:port/path inside the node namespace: (status, body)."""

        def fetch() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}{path}", timeout=timeout
                ) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as err:
                return err.code, err.read().decode()

        return run_in_netns(self.topology.node_ns, fetch)

    def metrics(self) -> dict[str, float]:
        """The proxy's /metrics as {series: value}.

        Series with labels keep them; each labelled metric also appears under its bare
        name with the sum over its label sets (e.g. over `ip_family`).
        """
        _, text = self.http_get(METRICS_PORT, "/metrics")
        values: dict[str, float] = {}
        sums: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                values[series] = float(value)
                name, brace, _ = series.partition("{")
                if brace:
                    sums[name] = sums.get(name, 0.0) + float(value)
        for name, total in sums.items():
            values.setdefault(name, total)
        return values

    def wait_for(
        self, what: str, check: Callable[[], bool], timeout: float = 20.0, every: float = 0.1
    ) -> float:
        """Poll `check` until true; return the seconds it took, or raise naming `what`."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proxy is not None and self.proxy.poll() is not None:
                raise RuntimeError(f"proxy exited ({self.proxy.returncode}) waiting for {what}")
            try:
                if check():
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    def wait_proxy_ready(self, timeout: float = 30.0) -> float:
        """Until the proxy has synced once and /healthz answers 200."""

        def ready() -> bool:
            code, _ = self.http_get(HEALTHZ_PORT, "/healthz")
            return (
                code == 200
                and self.metrics().get("kubeproxy_sync_proxy_rules_duration_seconds_count", 0) > 0
            )

        return self.wait_for("the proxy's first sync", ready, timeout)
