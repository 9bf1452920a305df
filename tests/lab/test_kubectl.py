"""The real `kubectl` (v1.32) against the lab API double.

One API server per module on 127.0.0.1; every kubectl call gets its own `HOME` and
discovery cache under the test's temporary directory (nothing is read from or
written to the user's `~/.kube`), a kubeconfig pointing at the double (or just
`--server`), and a timeout. `get -w` runs as a child process whose output is read on
a thread, so a missing line fails the test after a bounded wait.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.apiserver import ApiServer, write_kubeconfig
from lab.slicewriter import LabPod, SliceWriter

pytestmark = pytest.mark.e2e

KUBECTL = Path("/usr/bin/kubectl")
TIMEOUT = 20.0

SERVICE_YAML = """\
apiVersion: v1
kind: Service
metadata:
  name: {name}
  labels:
    app: {name}
spec:
  type: NodePort
  selector:
    app: {name}
  ports:
  - name: http
    port: 80
    targetPort: http
"""


class Kubectl:
    def __init__(self, api: ApiServer, workdir: Path) -> None:
        self.api = api
        self.workdir = workdir
        self.kubeconfig = write_kubeconfig(workdir / "kubeconfig", api.url)
        self.env = {
            "HOME": str(workdir),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "KUBECONFIG": str(self.kubeconfig),
        }

    def argv(self, *args: str) -> list[str]:
        return [
            str(KUBECTL),
            f"--cache-dir={self.workdir / 'cache'}",
            "--request-timeout=10s",
            *args,
        ]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def kubectl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubectl]:
    if not KUBECTL.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{KUBECTL} is required on CI")
        pytest.skip(f"{KUBECTL} is not installed")
    api = ApiServer()
    api.start()
    try:
        yield Kubectl(api, tmp_path_factory.mktemp("kubectl"))
    finally:
        api.stop()


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.strip().splitlines()]


def test_get_prints_the_servers_table(kubectl: Kubectl) -> None:
    api = kubectl.api
    created = api.create(
        "services",
        {"metadata": {"name": "listed"}, "spec": {"ports": [{"port": 443, "name": "https"}]}},
        namespace="default",
    )
    header, *lines = rows(kubectl.run("get", "services").stdout)
    assert header == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert ["listed", "ClusterIP", created["spec"]["clusterIP"], "<none>", "443/TCP"] in [
        line[:5] for line in lines
    ]
    all_namespaces = rows(kubectl.run("get", "svc", "-A").stdout)
    assert all_namespaces[0][0] == "NAMESPACE"
    # --server alone (no kubeconfig at all) works too.
    env_without_config = {k: v for k, v in kubectl.env.items() if k != "KUBECONFIG"}
    bare = subprocess.run(
        kubectl.argv(f"--server={api.url}", "get", "svc", "listed", "-o", "name"),
        capture_output=True,
        text=True,
        env=env_without_config,
        timeout=TIMEOUT,
        check=True,
    )
    assert bare.stdout.strip() == "service/listed"
    api.delete("services", "listed", namespace="default")


def test_create_from_yaml_get_json_and_delete(kubectl: Kubectl) -> None:
    manifest = kubectl.write("web.yaml", SERVICE_YAML.format(name="web"))
    assert kubectl.run("create", "-f", str(manifest)).stdout.strip() == "service/web created"
    svc = json.loads(kubectl.run("get", "service", "web", "-o", "json").stdout)
    assert svc["spec"]["clusterIP"].startswith("198.19.")
    assert 30000 <= svc["spec"]["ports"][0]["nodePort"] <= 32767
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert (
        kubectl.api.get("services", "web", namespace="default")["metadata"]["uid"]
        == (svc["metadata"]["uid"])
    )

    again = kubectl.run("create", "-f", str(manifest), check=False)
    assert again.returncode == 1 and "AlreadyExists" in again.stderr

    patched = kubectl.run("patch", "svc", "web", "-p", '{"metadata":{"labels":{"tier":"front"}}}')
    assert "patched" in patched.stdout
    labelled = kubectl.run("get", "svc", "-l", "tier in (front)", "-o", "name").stdout
    assert labelled.strip() == "service/web"

    deleted = kubectl.run("delete", "service", "web")
    assert deleted.stdout.strip() == 'service "web" deleted'
    missing = kubectl.run("get", "service", "web", check=False)
    assert missing.returncode == 1 and 'services "web" not found' in missing.stderr


def test_server_side_validation_errors_reach_the_user(kubectl: Kubectl) -> None:
    bad_port = SERVICE_YAML.format(name="bad").replace("port: 80", "port: 0")
    result = kubectl.run("create", "-f", str(kubectl.write("bad.yaml", bad_port)), check=False)
    assert result.returncode == 1
    assert 'Service "bad" is invalid' in result.stderr and "spec.ports[0].port" in result.stderr
    unknown = SERVICE_YAML.format(name="typo").replace("selector:", "selektor:")
    result = kubectl.run("create", "-f", str(kubectl.write("typo.yaml", unknown)), check=False)
    assert result.returncode == 1 and 'unknown field "spec.selektor"' in result.stderr


def test_apply_creates_then_leaves_unchanged(kubectl: Kubectl) -> None:
    manifest = kubectl.write("applied.yaml", SERVICE_YAML.format(name="applied"))
    assert kubectl.run("apply", "-f", str(manifest)).stdout.strip() == "service/applied created"
    assert kubectl.run("apply", "-f", str(manifest)).stdout.strip() == "service/applied unchanged"
    kubectl.run("delete", "-f", str(manifest))


def test_get_watch_prints_a_new_service(kubectl: Kubectl) -> None:
    proc = subprocess.Popen(
        kubectl.argv("get", "services", "--watch"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=kubectl.env,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        kubectl.api.wait_for_watches("services", timeout=TIMEOUT)
        kubectl.api.create(
            "services",
            {"metadata": {"name": "watched"}, "spec": {"ports": [{"port": 8080}]}},
            namespace="default",
        )
        deadline = time.monotonic() + TIMEOUT
        seen: list[str] = []
        while not any(line.startswith("watched ") for line in seen):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line for the new service; got {seen}"
            try:
                seen.append(lines.get(timeout=remaining))
            except queue.Empty:
                continue
        assert "8080/TCP" in next(line for line in seen if line.startswith("watched "))
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        reader.join(5)
        kubectl.api.delete("services", "watched", namespace="default")
    kubectl.api.wait_for_watches_closed("services", timeout=5)


def test_endpointslices_nodes_and_namespaces(kubectl: Kubectl) -> None:
    api = kubectl.api
    writer = SliceWriter(api)
    try:
        writer.set_pod(
            LabPod(
                name="web-1",
                namespace="default",
                ip="198.18.64.10",
                node_name="lab-node",
                labels={"app": "sliced"},
                ready=True,
                terminating=False,
                container_ports={"http": (8080, "TCP")},
            )
        )
        kubectl.run(
            "create", "-f", str(kubectl.write("sliced.yaml", SERVICE_YAML.format(name="sliced")))
        )
        header, *lines = rows(kubectl.run("get", "endpointslices").stdout)
        assert header == ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
        sliced = [line for line in lines if line[0].startswith("sliced-")]
        assert [line[1:4] for line in sliced] == [["IPv4", "8080", "198.18.64.10"]]
        as_json = json.loads(
            kubectl.run(
                "get",
                "endpointslices.discovery.k8s.io",
                "-l",
                "kubernetes.io/service-name=sliced",
                "-o",
                "json",
            ).stdout
        )
        assert [item["metadata"]["name"] for item in as_json["items"]] == [sliced[0][0]]
        kubectl.run("delete", "svc", "sliced")
        assert "sliced-" not in kubectl.run("get", "endpointslices", "-A").stdout
    finally:
        writer.close()
    api.create(
        "nodes",
        {
            "metadata": {"name": "lab-node"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
    )
    node = rows(kubectl.run("get", "nodes").stdout)
    assert node[0][:3] == ["NAME", "STATUS", "ROLES"] and node[1][:2] == ["lab-node", "Ready"]
    namespaces = [line[0] for line in rows(kubectl.run("get", "namespaces").stdout)[1:]]
    assert {"default", "kube-system"} <= set(namespaces)
