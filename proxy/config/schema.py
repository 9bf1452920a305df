"""The `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration` schema, as data.

`SCHEMA` is the field tree of upstream's v1alpha1 type (field names are case-sensitive,
as in Go's JSON decoding); each leaf is one of the `Leaf` kinds, each inner dict a
sub-object. `HARMLESS_VALUES` lists the known fields this proxy does not implement,
with the values that mean "as upstream's default" (durations in seconds): any other
value is worth a warning. Fields absent there and never read (winkernel, portRange,
logging.options, ...) never matter on a Linux node, or are a no-op for us
(bindAddressHardFail: we always fail hard).

Data only; the reader in `proxy.config.file` walks it.
"""

from __future__ import annotations

from typing import Any, cast

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"

# Leaf kinds of the v1alpha1 schema, as messages name them; a nested dict is a sub-object.
STR, BOOL, INT, FLOAT, DURATION, STRLIST, BOOLMAP, ANY = (
    "a string",
    "a boolean",
    "an integer",
    "a number",
    "a duration",
    "a list of strings",
    "a map of booleans",
    "anything",
)

SCHEMA: dict[str, Any] = {
    "apiVersion": STR,
    "kind": STR,
    "featureGates": BOOLMAP,
    "clientConnection": {
        "kubeconfig": STR,
        "acceptContentTypes": STR,
        "contentType": STR,
        "qps": FLOAT,
        "burst": INT,
    },
    "logging": {
        "format": STR,
        "flushFrequency": ANY,  # a duration string or integer nanoseconds
        "verbosity": INT,
        "vmodule": ANY,
        "options": ANY,
    },
    "hostnameOverride": STR,
    "bindAddress": STR,
    "healthzBindAddress": STR,
    "metricsBindAddress": STR,
    "bindAddressHardFail": BOOL,
    "enableProfiling": BOOL,
    "showHiddenMetricsForVersion": STR,
    "serviceProxyName": STR,
    "mode": STR,
    "syncPeriod": DURATION,
    "minSyncPeriod": DURATION,
    "iptables": {
        "masqueradeBit": INT,
        "masqueradeAll": BOOL,
        "localhostNodePorts": BOOL,
        "syncPeriod": DURATION,
        "minSyncPeriod": DURATION,
    },
    "ipvs": {
        "syncPeriod": DURATION,
        "minSyncPeriod": DURATION,
        "scheduler": STR,
        "excludeCIDRs": STRLIST,
        "strictARP": BOOL,
        "tcpTimeout": DURATION,
        "tcpFinTimeout": DURATION,
        "udpTimeout": DURATION,
    },
    "nftables": {
        "masqueradeBit": INT,
        "masqueradeAll": BOOL,
        "syncPeriod": DURATION,
        "minSyncPeriod": DURATION,
        "tableName": STR,
    },
    "winkernel": {
        "networkName": STR,
        "sourceVip": STR,
        "enableDSR": BOOL,
        "rootHnsEndpointName": STR,
        "forwardHealthCheckVip": BOOL,
    },
    "windowsRunAsService": BOOL,
    "detectLocalMode": STR,
    "detectLocal": {"bridgeInterface": STR, "interfaceNamePrefix": STR},
    "clusterCIDR": STR,
    "nodePortAddresses": STRLIST,
    "oomScoreAdj": INT,
    "conntrack": {
        "maxPerCore": INT,
        "min": INT,
        "tcpEstablishedTimeout": DURATION,
        "tcpCloseWaitTimeout": DURATION,
        "tcpBeLiberal": BOOL,
        "udpTimeout": DURATION,
        "udpStreamTimeout": DURATION,
    },
    "configSyncPeriod": DURATION,
    "portRange": STR,
    "udpIdleTimeout": DURATION,
}

HARMLESS_VALUES: dict[str, tuple[object, ...]] = {
    "featureGates": ({},),
    "clientConnection.acceptContentTypes": ("",),
    "clientConnection.contentType": ("", "application/vnd.kubernetes.protobuf", "application/json"),
    "clientConnection.qps": (0, 5),
    "clientConnection.burst": (0, 10),
    "logging.format": ("", "text"),
    "logging.vmodule": ([],),
    "bindAddress": ("", "0.0.0.0", "::"),
    "enableProfiling": (False,),
    "showHiddenMetricsForVersion": ("",),
    "serviceProxyName": ("",),
    "nftables.tableName": ("", "kube-proxy"),
    "detectLocalMode": ("", "ClusterCIDR"),
    "detectLocal.bridgeInterface": ("",),
    "detectLocal.interfaceNamePrefix": ("",),
    "oomScoreAdj": (-999,),
    "configSyncPeriod": (0, 900),
}


def leaf_kind(dotted: str) -> str:
    """The kind of the leaf at `dotted` (e.g. "conntrack.min" -> INT); `KeyError` if none."""
    node: Any = SCHEMA
    for part in dotted.split("."):
        node = node[part]
    return cast(str, node)
