"""nftables behind a small interface: one text script in, one atomic transaction out.

Two ways to run a script, the same text for both (`nft -f` syntax):

- `NftLibrary`: libnftables (`libnftables.so.1`, shipped with the `nftables` package)
  called in-process through ctypes. No Python binding is needed (Debian's
  `python3-nftables` is not importable from a virtualenv; ctypes is four functions).
- `NftProcess`: `nft -f -` per script, through a `CommandRunner` (the unit tests' fake
  `nft` plugs in here, and it is the fallback when the library cannot be loaded).

Kernel facts measured on this machine (nft 1.0.6, kernel 6.18, 2 vCPU; the layout
the nftables backend renders, 10k services x 10 endpoints, 9 MB of script):

- A whole script is one netlink batch: the kernel applies all of it or none of it
  (a refused element leaves the ruleset byte-identical). Errors name the script line:
  ``/dev/stdin:12:5-9: Error: ...`` from the process, ``<cmdline>:12:...`` from the
  library; `failed_line` reads either.
- Full load of the 10k x 10 table: 2.5 s through the library, 2.8 s through `nft -f`.
- One endpoint changed (four element operations) at 10k x 10: 0.5 ms through the
  library (the context keeps its cache while the ruleset generation does not move),
  29 ms through a new `nft` process, which spawns and rebuilds its cache every time.
  So the library is the default, and `nft -f` the fallback.
- Listing is where nft 1.0.6 is slow: `list tables`, `list chain T C` and `list
  counters` each fetch the whole ruleset, sets with all their elements (2-3 s at
  10k x 10, by process or library, and the library then holds it in memory), while
  `list chains` fetches tables and chain headers only (5 ms by process, under 1 ms in
  the library). So the canary check and cleanup read `list chains`, nothing else.

Network namespaces: a libnftables context talks to the kernel through a netlink socket
opened when the context is created, in the network namespace of the creating thread.
With `netns` set, the context is created by a short-lived helper thread that first
enters ``/run/netns/<netns>`` (setns affects only that thread); every later call uses
that socket, from whichever thread, and so that namespace.

Concurrency: a context is not thread-safe. The backend calls `execute` from the
proxier's single sync thread only; each call blocks until the kernel answered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Protocol

from proxy.kernel.commands import CommandRunner

log = logging.getLogger(__name__)

NFT = "nft"
_CLONE_NEWNET = 0x40000000
_LINE = re.compile(r"^(?:/dev/stdin|<cmdline>|[^\s:]+):(\d+):\d+(?:-\d+)?: Error", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class NftResult:
    """What one script did: success, what it printed, what it complained about."""

    ok: bool
    output: str
    error: str


class NftError(Exception):
    """The kernel (or nft's parser) refused a script; nothing of it was applied.

    `line` is the 1-based script line the error names, when it names one.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class Nft(Protocol):
    """Runs one nft script as one transaction."""

    def execute(self, script: str) -> NftResult: ...


def failed_line(error: str) -> int | None:
    """The script line an nft error message names (the first one), if any."""
    match = _LINE.search(error)
    return int(match.group(1)) if match else None


def chains_by_table(listing: str) -> dict[str, set[str]]:
    """`nft list chains` output -> {"ip kube-proxy-py": {"canary", ...}, ...}.

    Every table appears, also one without chains.
    """
    tables: dict[str, set[str]] = {}
    current: set[str] | None = None
    for raw in listing.splitlines():
        line = raw.strip()
        if line.startswith("table ") and line.endswith("{"):
            current = tables.setdefault(line[len("table ") : -1].strip(), set())
        elif line.startswith("chain ") and line.endswith("{") and current is not None:
            current.add(line[len("chain ") : -1].strip())
    return tables


def apply(nft: Nft, script: str) -> str:
    """Run `script`; raise `NftError` naming the refused line when it fails."""
    result = nft.execute(script)
    if not result.ok:
        detail = result.error.strip() or "nft failed without a message"
        raise NftError(detail, failed_line(result.error))
    return result.output


class NftProcess:
    """`nft -f -` through a command runner (one process per script).

    With `check`, `nft -c`: the kernel checks the batch and aborts it (nothing applied).
    """

    def __init__(self, runner: CommandRunner, *, check: bool = False) -> None:
        self._runner = runner
        self._argv = [NFT, "-c", "-f", "-"] if check else [NFT, "-f", "-"]

    def execute(self, script: str) -> NftResult:
        result = self._runner.run(self._argv, stdin=script)
        return NftResult(result.ok, result.stdout, result.stderr)


class NftLibraryError(Exception):
    """libnftables cannot be loaded here (not installed, or an unusable namespace)."""


class NftLibrary:
    """libnftables in-process (see the module docstring)."""

    def __init__(self, netns: str | None = None, *, diagnose: Nft | None = None) -> None:
        self._diagnose = diagnose
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as err:
            raise NftLibraryError(f"cannot load {name}: {err}") from err
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        self._ctx = self._new_context(netns)

    def _create(self) -> int:
        ctx = self._lib.nft_ctx_new(0)
        if not ctx:
            raise NftLibraryError("nft_ctx_new failed")
        # Buffered: output and errors are returned, never printed on our stdout.
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        return int(ctx)

    def _new_context(self, netns: str | None) -> int:
        if netns is None:
            return self._create()
        made: list[int] = []
        failed: list[BaseException] = []

        def in_namespace() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        errno = ctypes.get_errno()
                        raise NftLibraryError(f"setns {netns}: {os.strerror(errno)}")
                finally:
                    os.close(fd)
                made.append(self._create())
            except BaseException as err:  # reported to the caller below
                failed.append(err)

        helper = threading.Thread(target=in_namespace, name=f"nft-netns-{netns}")
        helper.start()
        helper.join()
        if failed:
            err = failed[0]
            if isinstance(err, NftLibraryError):
                raise err
            raise NftLibraryError(f"cannot open libnftables in {netns}: {err}") from err
        return made[0]

    def execute(self, script: str) -> NftResult:
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0 and failed_line(error) is None and self._diagnose is not None:
            # libnftables 1.0.6 reports a kernel refusal without its line number (and
            # echoes the wrong line); `nft -c` of the same script names it, applying nothing.
            checked = self._diagnose.execute(script)
            if not checked.ok and failed_line(checked.error) is not None:
                error = checked.error
        return NftResult(rc == 0, output, error)


def open_nft(netns: str | None, runner: CommandRunner) -> Nft:
    """The library when it loads, else `nft -f -` through `runner`."""
    try:
        return NftLibrary(netns, diagnose=NftProcess(runner, check=True))
    except NftLibraryError as err:
        log.warning("libnftables unavailable (%s); running `nft -f -` per sync", err)
        return NftProcess(runner)
