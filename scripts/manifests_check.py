"""Checks of the rendered manifests, run by scripts/manifests-check.sh (not part of the proxy).

`kubectl kustomize` renders every variant to a multi-document YAML file; this module
reads those files and runs two kinds of check, each a subcommand so it can run in the
virtualenv that has what it needs:

- `schemas` (the tools virtualenv, with `kubernetes-validate`): every Kubernetes object
  against the official OpenAPI-derived JSON schemas, strictly (unknown fields are
  errors), for each Kubernetes version asked for. Objects of other API groups (the
  ServiceMonitor) are written to a JSON file for the Node.js check of their CRD schema.
  A deliberately broken DaemonSet must be refused, so a validator that accepts anything
  fails the check.
- `project` (the project's virtualenv): what the schemas cannot know. The ClusterRole
  equals kube-proxy's `system:node-proxier`; the DaemonSet keeps kubeadm's shape and the
  least-privilege split; the ConfigMap's `KubeProxyConfiguration` is accepted by the
  proxy's own parser, in the variant's mode, with no unknown field; the container's
  arguments, expanded as the kubelet expands `$(VAR)`, are accepted by the proxy's own
  command line; the sysctl file is well formed; every metric the Grafana dashboard
  queries is one the proxy exports; and an unknown mode in the ConfigMap is refused with
  a message naming the field and the value.

Everything is single-threaded and reads local files only; the proxy's parsers are pure.
Exit status 1 and one line per failed check on any problem.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

# kube-proxy's ClusterRole, as kubernetes/kubernetes bootstrappolicy/policy.go builds it:
# `nodeProxierRules` (services+endpoints list/watch, nodes get/list/watch, `eventsRule()`
# = events create/patch/update in "" and events.k8s.io) plus endpointslices list/watch.
Rule = tuple[frozenset[str], frozenset[str], frozenset[str]]
NODE_PROXIER_RULES: frozenset[Rule] = frozenset(
    {
        (frozenset({""}), frozenset({"endpoints", "services"}), frozenset({"list", "watch"})),
        (frozenset({""}), frozenset({"nodes"}), frozenset({"get", "list", "watch"})),
        (
            frozenset({"", "events.k8s.io"}),
            frozenset({"events"}),
            frozenset({"create", "patch", "update"}),
        ),
        (
            frozenset({"discovery.k8s.io"}),
            frozenset({"endpointslices"}),
            frozenset({"list", "watch"}),
        ),
    }
)
PROXY_CAPABILITIES = frozenset({"NET_ADMIN", "NET_RAW"})
FAKE_NODE_NAME = "node-a"
FAKE_HOST_IP = "198.18.0.2"
CONFIG_MOUNT = "/etc/kube-proxy-py"
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_METRIC = re.compile(r"\b(kubeproxy_[a-z0-9_]+)\b")


@dataclass
class Report:
    """Failed checks, collected so one run names every problem."""

    failures: list[str] = field(default_factory=list)
    passed: int = 0

    def check(self, ok: bool, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
        return ok


def load_documents(path: Path) -> list[Object]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def find(objects: Iterable[Object], kind: str, name_prefix: str = "") -> list[Object]:
    return [
        obj
        for obj in objects
        if obj.get("kind") == kind and obj["metadata"]["name"].startswith(name_prefix)
    ]


# -- schemas ----------------------------------------------------------------------------


def check_schemas(
    files: Sequence[Path], versions: Sequence[str], foreign_out: Path, report: Report
) -> None:
    """Every core object against the strict schemas; other API groups go to `foreign_out`."""
    validator = importlib.import_module("kubernetes_validate")
    foreign: list[dict[str, Any]] = []
    daemonset: Object | None = None
    for path in files:
        for obj in load_documents(path):
            label = f"{path.name}: {obj['kind']}/{obj['metadata']['name']}"
            if "coreos.com" in obj.get("apiVersion", ""):
                foreign.append({"file": path.name, "object": obj})
                continue
            if obj["kind"] == "DaemonSet":
                daemonset = obj
            for version in versions:
                try:
                    validator.validate(obj, version, strict=True)
                except Exception as err:
                    message = getattr(err, "message", str(err))
                    report.check(False, f"{label} fails the Kubernetes {version} schema: {message}")
                else:
                    report.check(True, label)
    foreign_out.write_text(json.dumps(foreign), encoding="utf-8")
    # The validator must refuse a misspelt field, or every "pass" above means nothing.
    if report.check(daemonset is not None, "no DaemonSet rendered"):
        assert daemonset is not None
        broken = json.loads(json.dumps(daemonset))
        broken["spec"]["template"]["spec"]["hostNetwrk"] = True
        try:
            validator.validate(broken, versions[-1], strict=True)
        except Exception:
            report.check(True, "control")
        else:
            report.check(False, "the schema validator accepted a misspelt field (hostNetwrk)")


# -- project ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One rendered file and what it must hold."""

    path: Path
    mode: str
    monitoring: bool = False
    """The monitoring component is in: metrics on the node IP, Service, ServiceMonitor."""
    configured: bool = False
    """A cluster's own overlay: the API server address and the cluster CIDR are set."""


VARIANT_FLAGS = ("monitoring", "configured")


def parse_variant(text: str) -> Variant:
    """`FILE:MODE[:FLAG,...]` from the command line (flags: monitoring, configured)."""
    path, _, rest = text.partition(":")
    mode, _, flag_text = rest.partition(":")
    flags = set(flag_text.split(",")) - {""}
    if not path or not mode or not flags <= set(VARIANT_FLAGS):
        raise argparse.ArgumentTypeError(
            f"want FILE:MODE[:FLAG,...] with flags from {VARIANT_FLAGS}, got {text!r}"
        )
    return Variant(Path(path), mode, "monitoring" in flags, "configured" in flags)


def expand_kubelet_vars(value: str, env: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion in command and args: `$$` escapes, unknown stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, value)


def container_env(container: Object, config_maps: Mapping[str, Object]) -> dict[str, str]:
    """The container's environment as the kubelet would build it on a test node."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name", "")
        env.update(config_maps.get(ref, {}).get("data", {}))
    downward = {"spec.nodeName": FAKE_NODE_NAME, "status.hostIP": FAKE_HOST_IP}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand_kubelet_vars(item["value"], env)
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = downward[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def rules_of(role: Object) -> set[Rule]:
    return {
        (
            frozenset(rule.get("apiGroups", [])),
            frozenset(rule.get("resources", [])),
            frozenset(rule.get("verbs", [])),
        )
        for rule in role.get("rules", [])
    }


def check_rbac(objects: list[Object], report: Report, where: str) -> None:
    roles = find(objects, "ClusterRole")
    if not report.check(len(roles) == 1, f"{where}: want exactly one ClusterRole"):
        return
    role = roles[0]
    report.check(
        all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role.get("rules", [])),
        f"{where}: ClusterRole rules may only name apiGroups, resources and verbs",
    )
    report.check(
        rules_of(role) == set(NODE_PROXIER_RULES),
        f"{where}: ClusterRole {role['metadata']['name']} differs from system:node-proxier: "
        f"{role.get('rules')}",
    )
    bindings = find(objects, "ClusterRoleBinding")
    accounts = find(objects, "ServiceAccount")
    ok = len(bindings) == 1 and len(accounts) == 1
    if not report.check(ok, f"{where}: want one ClusterRoleBinding and one ServiceAccount"):
        return
    binding, account = bindings[0], accounts[0]
    report.check(
        binding["roleRef"]
        == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role["metadata"]["name"],
        }
        and binding["subjects"]
        == [
            {
                "kind": "ServiceAccount",
                "name": account["metadata"]["name"],
                "namespace": account["metadata"]["namespace"],
            }
        ],
        f"{where}: the binding does not bind the ClusterRole to the ServiceAccount",
    )


def check_pod_shape(pod: Object, report: Report, where: str, account: str) -> None:
    """kubeadm's kube-proxy shape, kept."""
    report.check(pod.get("hostNetwork") is True, f"{where}: hostNetwork must be true")
    report.check(
        pod.get("dnsPolicy") == "Default",
        f"{where}: dnsPolicy must be Default: cluster DNS needs the Services this pod programs",
    )
    report.check(
        pod.get("priorityClassName") == "system-node-critical",
        f"{where}: priorityClassName must be system-node-critical",
    )
    report.check(
        {"operator": "Exists"} in pod.get("tolerations", []),
        f"{where}: must tolerate every taint (operator: Exists, no key)",
    )
    report.check(
        pod.get("serviceAccountName") == account, f"{where}: serviceAccountName != {account}"
    )
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    report.check(
        volumes.get("xtables-lock", {}).get("hostPath")
        == {"path": "/run/xtables.lock", "type": "FileOrCreate"},
        f"{where}: the xtables-lock volume must be hostPath /run/xtables.lock (FileOrCreate)",
    )
    report.check(
        volumes.get("lib-modules", {}).get("hostPath", {}).get("path") == "/lib/modules",
        f"{where}: the lib-modules volume must be hostPath /lib/modules",
    )


def check_proxy_container(container: Object, report: Report, where: str) -> None:
    mounts = {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}
    report.check(
        mounts.get("/run/xtables.lock", {}).get("name") == "xtables-lock"
        and not mounts["/run/xtables.lock"].get("readOnly", False),
        f"{where}: /run/xtables.lock must be mounted writable",
    )
    report.check(
        mounts.get("/lib/modules", {}).get("readOnly") is True,
        f"{where}: /lib/modules must be mounted read-only",
    )
    env = {item["name"]: item for item in container.get("env", [])}
    report.check(
        env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        == "spec.nodeName",
        f"{where}: NODE_NAME must come from spec.nodeName",
    )
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/healthz")):
        report.check(
            container.get(probe, {}).get("httpGet", {}).get("path") == path
            and container[probe]["httpGet"].get("port") == 10256,
            f"{where}: {probe} must GET {path} on port 10256",
        )
    security = container.get("securityContext", {})
    capabilities = security.get("capabilities", {})
    report.check(
        not security.get("privileged", False)
        and security.get("allowPrivilegeEscalation") is False
        and security.get("readOnlyRootFilesystem") is True
        and capabilities.get("drop") == ["ALL"]
        and set(capabilities.get("add", [])) <= PROXY_CAPABILITIES,
        f"{where}: the proxy container must be unprivileged, drop ALL and add only "
        f"{sorted(PROXY_CAPABILITIES)} (got {security})",
    )


def check_init_container(pod: Object, variant: Variant, report: Report, where: str) -> None:
    inits = pod.get("initContainers", [])
    if not report.check(len(inits) == 1, f"{where}: want one init container (node-init)"):
        return
    init = inits[0]
    report.check(
        init.get("command", [None])[0] == "kpy-node-init"
        and init.get("securityContext", {}).get("privileged") is True,
        f"{where}: the init container must run kpy-node-init, privileged",
    )
    modules = {
        item["name"]: item.get("value", "") for item in init.get("env", []) if "name" in item
    }.get("KPY_MODULES", "")
    report.check("nf_conntrack" in modules.split(), f"{where}: KPY_MODULES lacks nf_conntrack")
    if variant.mode == "ipvs":
        report.check("ip_vs" in modules.split(), f"{where}: ipvs needs ip_vs in KPY_MODULES")


def check_sysctls(text: str, variant: Variant, report: Report, where: str) -> None:
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        ok = bool(sep) and re.fullmatch(r"-?[a-z0-9_.]+", key.strip()) is not None
        report.check(ok and bool(value.strip()), f"{where}: sysctls.conf:{number}: {raw!r}")
        keys.append(key.strip().lstrip("-"))
    if variant.mode == "ipvs":
        report.check(
            "net.ipv4.vs.conntrack" in keys, f"{where}: ipvs needs net.ipv4.vs.conntrack = 1"
        )


def check_config_and_args(
    config_text: str,
    container: Object,
    config_maps: Mapping[str, Object],
    *,
    variant: Variant,
    report: Report,
    where: str,
) -> None:
    config_mod = importlib.import_module("proxy.config.file")
    errors_mod = importlib.import_module("proxy.config.errors")
    cli_mod = importlib.import_module("proxy.cli")
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp, "config.conf")
        config_path.write_text(config_text, encoding="utf-8")
        try:
            parsed = config_mod.load_config_file(config_path)
        except errors_mod.ConfigError as err:
            report.check(False, f"{where}: the proxy refuses config.conf: {err}")
            return
        file_mode = parsed.get("proxy_mode")
        report.check(
            file_mode == variant.mode,
            f"{where}: config.conf mode is {file_mode}, the variant is {variant.mode}",
        )
        if variant.configured:
            report.check(bool(parsed.get("cluster_cidrs")), f"{where}: clusterCIDR is not set")
        report.check(
            not parsed.unknown_fields and not parsed.unsupported_fields,
            f"{where}: config.conf has unknown {parsed.unknown_fields} or unsupported "
            f"{parsed.unsupported_fields} fields",
        )
        env = container_env(container, config_maps)
        args = [
            expand_kubelet_vars(arg, env).replace(f"{CONFIG_MOUNT}/", f"{tmp}/")
            for arg in container.get("args", [])
        ]
        try:
            settings = cli_mod.parse_settings(args, environ=env)
        except errors_mod.ConfigError as err:
            report.check(False, f"{where}: the proxy refuses the container's args {args}: {err}")
            return
        report.check(
            settings.node_name == FAKE_NODE_NAME,
            f"{where}: node name {settings.node_name!r}, want the Node's ({FAKE_NODE_NAME})",
        )
        report.check(
            settings.proxy_mode == variant.mode and not settings.unsupported_flags,
            f"{where}: args give mode {settings.proxy_mode} / unsupported "
            f"{settings.unsupported_flags}",
        )
        want_metrics = f"{FAKE_HOST_IP}:10249" if variant.monitoring else "127.0.0.1:10249"
        report.check(
            settings.metrics_bind_address == want_metrics,
            f"{where}: metrics bind {settings.metrics_bind_address}, want {want_metrics}",
        )
        report.check(
            settings.healthz_bind_address == "0.0.0.0:10256",
            f"{where}: healthz bind {settings.healthz_bind_address}, the probes use 10256",
        )
        # Bad input: an unknown mode in this very ConfigMap stops the proxy, naming it.
        config_path.write_text(
            re.sub(r"(?m)^mode: .*$", "mode: bogus", config_text), encoding="utf-8"
        )
        try:
            cli_mod.parse_settings(args, environ=env)
        except errors_mod.ConfigError as err:
            report.check(
                'mode: "bogus"' in str(err), f"{where}: unclear error for mode bogus: {err}"
            )
        else:
            report.check(False, f"{where}: the proxy accepted mode: bogus")


def check_variant(variant: Variant, report: Report) -> None:
    where = variant.path.name
    objects = load_documents(variant.path)
    check_rbac(objects, report, where)
    daemonsets = find(objects, "DaemonSet")
    if not report.check(len(daemonsets) == 1, f"{where}: want exactly one DaemonSet"):
        return
    daemonset = daemonsets[0]
    report.check(
        daemonset["metadata"].get("namespace") == "kube-system",
        f"{where}: the DaemonSet belongs in kube-system",
    )
    pod = daemonset["spec"]["template"]["spec"]
    accounts = find(objects, "ServiceAccount")
    check_pod_shape(pod, report, where, accounts[0]["metadata"]["name"] if accounts else "")
    containers = pod.get("containers", [])
    if not report.check(len(containers) == 1, f"{where}: want one container"):
        return
    container = containers[0]
    check_proxy_container(container, report, where)
    check_init_container(pod, variant, report, where)
    config_maps = {obj["metadata"]["name"]: obj for obj in find(objects, "ConfigMap")}
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    config_name = volumes.get("config", {}).get("configMap", {}).get("name", "")
    data = config_maps.get(config_name, {}).get("data", {})
    if not report.check(
        "config.conf" in data and "sysctls.conf" in data,
        f"{where}: the config volume's ConfigMap {config_name!r} lacks config.conf/sysctls.conf",
    ):
        return
    for ref in container.get("envFrom", []):
        name = ref.get("configMapRef", {}).get("name", "")
        api = config_maps.get(name, {}).get("data", {})
        report.check(
            set(api) == {"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"},
            f"{where}: envFrom ConfigMap {name!r} must hold KUBERNETES_SERVICE_HOST/PORT",
        )
        if variant.configured:
            report.check(all(api.values()), f"{where}: the API server address is not set: {api}")
    check_sysctls(data["sysctls.conf"], variant, report, where)
    check_config_and_args(
        data["config.conf"], container, config_maps, variant=variant, report=report, where=where
    )
    if variant.monitoring:
        check_monitoring(objects, report, where)


def exported_metric_names() -> set[str]:
    """Every series name the proxy's `/metrics` can hold."""
    metrics_mod = importlib.import_module("proxy.metrics")
    registry = metrics_mod.ProxyMetrics(backend="iptables", process_metrics=False).registry
    names: set[str] = set()
    suffixes: Mapping[str, Sequence[str]] = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
    }
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def dashboard_exprs(node: object) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def check_monitoring(objects: list[Object], report: Report, where: str) -> None:
    dashboards = find(objects, "ConfigMap", "kube-proxy-py-dashboard")
    if not report.check(len(dashboards) == 1, f"{where}: want one dashboard ConfigMap"):
        return
    dashboard_cm = dashboards[0]
    report.check(
        dashboard_cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1",
        f"{where}: the dashboard ConfigMap needs grafana_dashboard: '1' for Grafana's sidecar",
    )
    exported = exported_metric_names()
    for key, text in dashboard_cm.get("data", {}).items():
        try:
            dashboard = json.loads(text)
        except json.JSONDecodeError as err:
            report.check(False, f"{where}: {key} is not JSON: {err}")
            continue
        used = {name for expr in dashboard_exprs(dashboard) for name in _METRIC.findall(expr)}
        report.check(bool(used), f"{where}: {key} queries no kubeproxy_* metric")
        for name in sorted(used):
            report.check(name in exported, f"{where}: {key} queries {name}, not exported")
    services = find(objects, "Service", "kube-proxy-py")
    monitors = [obj for obj in objects if obj.get("kind") == "ServiceMonitor"]
    ok = len(services) == 1 and len(monitors) == 1
    if report.check(ok, f"{where}: want one metrics Service and one ServiceMonitor"):
        service, monitor = services[0], monitors[0]
        report.check(
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"].get("labels", {}).items()
            and {port["name"] for port in service["spec"]["ports"]}
            >= {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]},
            f"{where}: the ServiceMonitor does not select the metrics Service and its port",
        )


# -- command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    schemas = commands.add_parser("schemas", help="Kubernetes JSON schema validation")
    schemas.add_argument("--version", action="append", required=True, dest="versions")
    schemas.add_argument("--foreign-out", type=Path, required=True)
    schemas.add_argument("files", nargs="+", type=Path)
    project = commands.add_parser("project", help="checks against the proxy's own code")
    project.add_argument("variants", nargs="+", type=parse_variant, metavar="FILE:MODE[:FLAGS]")
    args = parser.parse_args(argv)

    report = Report()
    if args.command == "schemas":
        check_schemas(args.files, args.versions, args.foreign_out, report)
    else:
        for variant in args.variants:
            check_variant(variant, report)
    for failure in report.failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"{args.command}: {report.passed} checks passed, {len(report.failures)} failed")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
