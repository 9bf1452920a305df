"""The seam between the shared core and the code that programs the kernel.

A backend receives, at every sync, the complete node-local desired state
(`ProxyState`) and a `SyncHint` of what changed since its last successful sync. All
semantics (which endpoints are usable, traffic policies, topology) are decided before
the backend is called; a backend only renders that state and writes it to the kernel.

Contract (what the proxier relies on, whatever the kernel API):

- `sync(state, hint)` either returns, meaning the kernel now matches `state`, or
  raises `BackendError`. A backend that writes in one atomic transaction
  (`iptables-restore` per table, one `nft -f`) leaves the old state on failure; one
  that cannot (IPVS over netlink: one message per virtual or real server) may leave
  any mix of old and new. Either way the proxier's next call is a full sync, and a
  full sync must converge from whatever is in the kernel, reading it back as needed.
- A partial sync (`hint.full` false) may trust `hint.changed`: every port not named
  there is exactly as the previous successful call left it. The work of a partial
  sync should be proportional to the change, not to the number of services.
- `drifted()` is cheap and is called on the periodic tick, not on every sync.
- `cleanup()` removes everything the backend owns and nothing else.
- A backend states which Service features it programs with a `supported_features`
  attribute (a set of `Feature`); without one it is taken to support
  `DEFAULT_FEATURES`. The core reports a Service using anything else; it does not
  filter the state, so a backend must still ignore what it cannot render.
- Never flush on start or exit: a backend's constructor touches no kernel state.
- One backend serves one IP family (`BackendConfig.family`); a dual-stack node runs
  one per family (`proxy.app`). A backend may implement `FamilyProbe` to say, by
  reading the kernel only, that its family cannot be served on this node (no
  `ip6tables`, IPv6 disabled); the node then runs single-stack, as upstream does.

Backends live one per subpackage, `proxy.backends.<name>`, and register themselves
with `@register("<name>")` when imported. `create(name, config)` imports only that
subpackage, so a backend that cannot be imported (a missing library, an unusable
kernel) breaks neither another mode nor `--cleanup` of the others.

Concurrency: the proxier calls `sync`, `cleanup` and `drifted` from its single sync
thread, never concurrently, so a backend needs no locking of its own.
`BackendConfig.request_sync` and the metrics sink may be called from that thread.
"""

from __future__ import annotations

import enum
import importlib
import logging
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from proxy.model import IPFamily, ProxyState, SyncHint

log = logging.getLogger(__name__)


class BackendError(Exception):
    """The kernel refused a sync; the proxier counts it, retries, and syncs fully next."""

    def __init__(self, message: str, *, offending_lines: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.offending_lines = tuple(offending_lines)


class UnknownBackendError(ValueError):
    """No backend is registered under the requested name, or it cannot be loaded."""


class BackendMetrics(Protocol):
    """What a backend reports about its own work (implemented by `proxy.metrics`)."""

    def set_iptables_rules(self, table: str, count: int, family: IPFamily | None = None) -> None:
        """Rules we own in one iptables table after a successful sync (upstream's gauge);
        `family` defaults to the backend's own (the sink knows it)."""

    def observe_phase(self, phase: str, seconds: float) -> None:
        """Time spent in one phase of a sync ("render", "write", "read")."""


class NullBackendMetrics:
    """A metrics sink that drops everything (tests, `--cleanup`)."""

    def set_iptables_rules(self, table: str, count: int, family: IPFamily | None = None) -> None:
        pass

    def observe_phase(self, phase: str, seconds: float) -> None:
        pass


def _no_sync_request(_delay: float) -> None:
    """What `request_sync` does when nobody listens (tests, `--cleanup`)."""


@dataclass(frozen=True, slots=True)
class IpvsOptions:
    """KubeProxyConfiguration `ipvs.*` and the `--ipvs-*` flags (durations in seconds)."""

    scheduler: str = "rr"
    """IPVS scheduler (`--ipvs-scheduler`); an empty value in the file means rr."""
    exclude_cidrs: tuple[str, ...] = ()
    """Virtual servers in these CIDRs are never touched by cleanup (`--ipvs-exclude-cidrs`)."""
    strict_arp: bool = False
    """Set arp_ignore=1 and arp_announce=2 (`--ipvs-strict-arp`)."""
    tcp_timeout: float = 0.0
    """Idle timeout of IPVS TCP connections; 0 leaves the kernel's value."""
    tcp_fin_timeout: float = 0.0
    """Timeout of IPVS TCP connections after a FIN; 0 leaves the kernel's value."""
    udp_timeout: float = 0.0
    """Timeout of IPVS UDP flows; 0 leaves the kernel's value."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """Settings fixed for a backend's lifetime, from flags and `KubeProxyConfiguration`."""

    family: IPFamily = IPFamily.V4
    masquerade_bit: int = 14
    """Bit of the packet mark that asks for masquerading (kube-proxy's default 14)."""
    netns: str | None = None
    """Run every kernel tool inside this named network namespace (tests and the lab)."""
    variant: str | None = None
    """Backend-specific flavour, e.g. "nft" or "legacy" for iptables; None picks one."""
    sync_period: float = 30.0
    """`--*-sync-period`: the period of the proxier's tick (canary check, retries)."""
    ipvs: IpvsOptions = field(default_factory=IpvsOptions)
    metrics: BackendMetrics = field(default_factory=NullBackendMetrics)
    """Where the backend reports its own figures."""
    request_sync: Callable[[float], None] = _no_sync_request
    """Ask for a sync `delay` seconds from now (e.g. IPVS graceful termination: delete a
    drained real server later). The sync comes through the proxier like any other."""
    localhost_nodeports: bool = True
    """iptables only: NodePorts also on 127.0.0.1 (`--iptables-localhost-nodeports`)."""
    large_cluster_endpoints: int = 1000
    """Above this many endpoints on the node, per-endpoint rule comments are dropped
    (upstream's large-cluster mode) to save memory and kernel work."""


class Backend(Protocol):
    """What every backend (iptables, nftables, IPVS) implements; see the module doc."""

    name: str

    def sync(self, state: ProxyState, hint: SyncHint) -> None:
        """Make the kernel match `state`, or raise `BackendError` (see the contract)."""

    def cleanup(self) -> bool:
        """Remove everything this backend owns; return True when anything was removed."""

    def drifted(self) -> bool:
        """True when the kernel lost our rules behind our back (a canary is missing)."""


class Feature(enum.StrEnum):
    """Service features a backend may or may not program (the `feature` metric label)."""

    SESSION_AFFINITY = "session-affinity"
    EXTERNAL_POLICY_LOCAL = "external-traffic-policy-local"
    INTERNAL_POLICY_LOCAL = "internal-traffic-policy-local"
    LOAD_BALANCER_IPS = "load-balancer-ips"
    SOURCE_RANGES = "load-balancer-source-ranges"
    EXTERNAL_IPS = "external-ips"
    SCTP = "sctp"
    IPV4 = "ipv4"
    IPV6 = "ipv6"


DEFAULT_FEATURES: frozenset[Feature] = frozenset(Feature)
"""What a backend supports unless it says otherwise: the iptables backend's set."""


def supported_features(backend: object) -> frozenset[Feature]:
    """The features `backend` programs: its `supported_features` attribute (a class
    attribute is enough), else `DEFAULT_FEATURES`.

    The core logs and counts a Service that uses anything else (`proxy.features`); the
    backend is still handed the whole state and ignores what it cannot render.
    """
    declared = getattr(backend, "supported_features", None)
    if declared is None:
        return DEFAULT_FEATURES
    return frozenset(Feature(item) for item in declared)


@runtime_checkable
class FamilyProbe(Protocol):
    """Optional: a backend that can tell, before its first sync, that its family is unusable."""

    def unusable_reason(self) -> str | None:
        """Why this backend's IP family cannot be served here, or None when it can.
        Reads the kernel (runs a tool's read-only command at most); writes nothing."""


BackendFactory = Callable[[BackendConfig], Backend]

_registry: dict[str, BackendFactory] = {}


def register(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Class or function decorator registering a backend factory under `name`."""

    def decorate(factory: BackendFactory) -> BackendFactory:
        if name in _registry and _registry[name] is not factory:
            raise ValueError(f"backend {name!r} registered twice")
        _registry[name] = factory
        return factory

    return decorate


def known() -> list[str]:
    """Names of the backend subpackages present, sorted; nothing is imported."""
    package = importlib.import_module("proxy.backends")
    return sorted(module.name for module in pkgutil.iter_modules(package.__path__) if module.ispkg)


def load(name: str) -> BackendFactory:
    """Import `proxy.backends.<name>` (only that) and return the factory it registered.

    Raises `UnknownBackendError` naming the mode when there is no such backend or its
    module fails to import (the import error is in the message).
    """
    if name not in known():
        names = ", ".join(known()) or "none"
        raise UnknownBackendError(f"proxy mode {name!r} is not implemented (available: {names})")
    try:
        importlib.import_module(f"proxy.backends.{name}")
    except ImportError as err:
        raise UnknownBackendError(f"proxy mode {name!r} cannot be loaded: {err}") from err
    try:
        return _registry[name]
    except KeyError:
        raise UnknownBackendError(
            f"proxy mode {name!r}: proxy.backends.{name} registered no backend"
        ) from None


def available() -> list[str]:
    """Names of the backends that import here, sorted (each imported on its own)."""
    names = []
    for name in known():
        try:
            load(name)
        except UnknownBackendError as err:
            log.debug("%s", err)
            continue
        names.append(name)
    return names


def create(name: str, config: BackendConfig) -> Backend:
    """Build the backend registered as `name`, importing only its subpackage."""
    return load(name)(config)
