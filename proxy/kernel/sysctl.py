"""Kernel tunables behind a small interface: sysctls in /proc/sys, module parameters in /sys/module.

`Tunables` is what the rest of the proxy sees: read an integer, write an integer, keyed
by a typed name (`Sysctl("net.ipv4.ip_forward")`,
`ModuleParameter("nf_conntrack", "hashsize")`). `ProcTunables` is the real one; its
root directory is injectable, so unit tests hand it a temporary directory laid out like
`/` (`<root>/proc/sys/...`, `<root>/sys/module/...`) and kernel tests run it unchanged
inside a network namespace.

Kernel facts this relies on (measured on 6.18):

- most `net.*` sysctls are per network namespace: the conntrack timeouts,
  `nf_conntrack_tcp_be_liberal`, `ip_forward`, `conf.all.arp_*` and (with ip_vs)
  `net.ipv4.vs.*`. A process sees and changes those of its own namespace;
- `net.netfilter.nf_conntrack_max` is global: writable only from the initial network
  namespace (mode 0444 elsewhere), and so is the nf_conntrack `hashsize` parameter
  (writing it from another namespace fails);
- a sysctl exists only while the module that owns it is loaded: `net.netfilter.nf_conntrack_*`
  needs nf_conntrack, `net.ipv4.vs.*` needs ip_vs. A missing key raises
  `MissingTunableError`, whose message names the module to load;
- /proc/sys is read-only in an unprivileged container: writes fail with EROFS or EACCES,
  raised as `TunableError` naming the key, the value and the reason.

One value per file, written in one `write(2)`. No state beyond the root path; safe to use
from any thread, though the proxy only uses it from the main thread at start-up.

`CommandTunables` reads and writes the same files through a `CommandRunner` (`cat`,
`tee`, both in coreutils), so a runner bound to a network namespace (kernel tests, the
lab) reaches that namespace's per-namespace sysctls, which a Python process cannot
open from outside it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from proxy.kernel.commands import CommandRunner


@dataclass(frozen=True, slots=True)
class Sysctl:
    """A sysctl by its dotted name, as `sysctl(8)` spells it: "net.ipv4.ip_forward"."""

    name: str

    def __str__(self) -> str:
        return f"sysctl {self.name}"


@dataclass(frozen=True, slots=True)
class ModuleParameter:
    """A kernel module's parameter: `ModuleParameter("nf_conntrack", "hashsize")`."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"module parameter {self.module}.{self.name}"


Tunable = Sysctl | ModuleParameter

ROUTE_LOCALNET = Sysctl("net.ipv4.conf.all.route_localnet")
"""1 lets packets with a 127/8 address be routed off the host: what localhost NodePorts
need once their DNAT sends 127.0.0.1 traffic to a pod (per network namespace)."""


class TunableError(OSError):
    """A tunable cannot be read or written; the message names it and says why."""


class MissingTunableError(TunableError):
    """The kernel has no such tunable (its module is not loaded, or it is too old)."""


class Tunables(Protocol):
    """Integer kernel tunables; every failure is a `TunableError` naming the tunable."""

    def read(self, key: Tunable) -> int:
        """The current value."""

    def write(self, key: Tunable, value: int) -> None:
        """Set the value."""


# Which module to load when a sysctl is missing, by name prefix.
_OWNERS: tuple[tuple[str, str], ...] = (
    ("net.netfilter.nf_conntrack_", "nf_conntrack"),
    ("net.ipv4.vs.", "ip_vs"),
)


def owning_module(key: Tunable) -> str | None:
    """The kernel module that provides `key`, when one must be loaded for it to exist."""
    if isinstance(key, ModuleParameter):
        return key.module
    for prefix, module in _OWNERS:
        if key.name.startswith(prefix):
            return module
    return None


class ProcTunables:
    """The tunables of the kernel, as seen from this process's network namespace."""

    def __init__(self, root: Path | str = "/") -> None:
        self._root = Path(root)

    def path(self, key: Tunable) -> Path:
        """Where `key` lives under the root."""
        if isinstance(key, ModuleParameter):
            return self._root / "sys/module" / key.module / "parameters" / key.name
        return self._root / "proc/sys" / key.name.replace(".", "/")

    def read(self, key: Tunable) -> int:
        path = self.path(key)
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise self._missing(key, path) from None
        except OSError as err:
            raise TunableError(f"cannot read {key} ({path}): {err.strerror or err}") from None
        try:
            return int(text.strip())
        except ValueError:
            raise TunableError(f"{key} ({path}) holds {text.strip()!r}, not a number") from None

    def write(self, key: Tunable, value: int) -> None:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except FileNotFoundError:
            raise self._missing(key, path) from None
        except OSError as err:
            raise self._refused(key, value, err) from None
        try:
            os.write(fd, f"{value}\n".encode("ascii"))
        except OSError as err:
            raise self._refused(key, value, err) from None
        finally:
            os.close(fd)

    def _missing(self, key: Tunable, path: Path) -> MissingTunableError:
        module = owning_module(key)
        fix = (
            f"load the {module} kernel module (modprobe {module})"
            if module
            else "this kernel does not have it"
        )
        return MissingTunableError(f"{key} does not exist ({path}): {fix}")

    def _refused(self, key: Tunable, value: int, err: OSError) -> TunableError:
        hint = ""
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = (
                " (writing it needs root in a privileged container; a global tunable such as"
                " nf_conntrack_max also needs the host network namespace)"
            )
        return TunableError(f"cannot set {key} = {value}: {err.strerror or err}{hint}")


class CommandTunables:
    """The tunables as seen by the processes `runner` starts (e.g. inside a namespace)."""

    def __init__(self, runner: CommandRunner) -> None:
        self._runner = runner
        self._paths = ProcTunables("/")

    def read(self, key: Tunable) -> int:
        path = self._paths.path(key)
        out = self._runner.run(["cat", str(path)])
        if not out.ok:
            if "No such file" in out.stderr:
                raise self._paths._missing(key, path)
            raise TunableError(f"cannot read {key} ({path}): {out.stderr.strip()}")
        try:
            return int(out.stdout.strip())
        except ValueError:
            raise TunableError(
                f"{key} ({path}) holds {out.stdout.strip()!r}, not a number"
            ) from None

    def write(self, key: Tunable, value: int) -> None:
        path = self._paths.path(key)
        out = self._runner.run(["tee", str(path)], stdin=f"{value}\n")
        if not out.ok:
            raise TunableError(f"cannot set {key} = {value}: {out.stderr.strip()}")
