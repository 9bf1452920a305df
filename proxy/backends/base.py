"""The seam between the shared core and the code that programs the kernel.

A backend receives, at every sync, the complete node-local desired state
(`ProxyState`) and a `SyncHint` of what changed since its last successful sync. All
semantics (which endpoints are usable, traffic policies, topology) are decided before
the backend is called; a backend only renders that state and writes it to the kernel
in one atomic step. It keeps whatever private memory of its own output it needs to
make partial syncs cheap, and must be correct with `hint.full` whatever that memory
says.

Backends register themselves by name (`@register("iptables")`); the core creates
them with `create(name, config)` and never imports a backend module directly.

Concurrency: the proxier calls `sync`, `cleanup` and `drifted` from its single sync
thread, never concurrently, so a backend needs no locking of its own.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.model import IPFamily, ProxyState, SyncHint


class BackendError(Exception):
    """The kernel refused a sync; the proxier counts it, retries, and syncs fully next."""

    def __init__(self, message: str, *, offending_lines: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.offending_lines = tuple(offending_lines)


class UnknownBackendError(ValueError):
    """No backend is registered under the requested name."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """Settings fixed for a backend's lifetime."""

    family: IPFamily = IPFamily.V4
    masquerade_bit: int = 14
    """Bit of the packet mark that asks for masquerading (kube-proxy's default 14)."""
    netns: str | None = None
    """Run every kernel tool inside this named network namespace (tests and the lab)."""
    variant: str | None = None
    """Backend-specific flavour, e.g. "nft" or "legacy" for iptables; None picks one."""


class Backend(Protocol):
    """What every backend (iptables, nftables, IPVS) implements."""

    name: str

    def sync(self, state: ProxyState, hint: SyncHint) -> None:
        """Make the kernel match `state` in one atomic write, or raise `BackendError`."""

    def cleanup(self) -> bool:
        """Remove everything this backend owns; return True when anything was removed."""

    def drifted(self) -> bool:
        """True when the kernel lost our rules behind our back (a canary is missing)."""


BackendFactory = Callable[[BackendConfig], Backend]

_registry: dict[str, BackendFactory] = {}


def register(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Class or function decorator registering a backend factory under `name`."""

    def decorate(factory: BackendFactory) -> BackendFactory:
        if name in _registry:
            raise ValueError(f"backend {name!r} registered twice")
        _registry[name] = factory
        return factory

    return decorate


def _load_backend_modules() -> None:
    """Import every module of `proxy.backends` so each can register itself."""
    package = importlib.import_module("proxy.backends")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "base":
            importlib.import_module(f"proxy.backends.{module.name}")


def available() -> list[str]:
    """Names of the registered backends, sorted."""
    _load_backend_modules()
    return sorted(_registry)


def create(name: str, config: BackendConfig) -> Backend:
    """Build the backend registered as `name`."""
    _load_backend_modules()
    try:
        factory = _registry[name]
    except KeyError:
        known = ", ".join(available()) or "none"
        raise UnknownBackendError(
            f"proxy mode {name!r} is not implemented (available: {known})"
        ) from None
    return factory(config)
