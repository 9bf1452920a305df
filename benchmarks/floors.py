"""The kernel floor: the raw tool loading a ruleset from a file into a fresh namespace.

Two floors per backend and grid point, timed in the same run as the proxy (machines
drift; a ratio measured minutes apart means little):

- `kernel_floor`: exactly the ruleset our proxy programmed, read back from the kernel
  after its sync (`Backend.save`), restored by `Backend.restore` into an empty network
  namespace, then read back and counted; then `Backend.touch` (the smallest commit) on
  top of it, timed `TOUCHES` times: what any one change costs the kernel at that size.
- `upstream_floor`: upstream kube-proxy's iptables layout for the same services
  (`benchmarks.upstream`), loaded the same way.

A floor whose read-back does not count the expected endpoints is reported failed
(`ok` false), not timed. The tool's peak RSS comes from `wait4(2)`'s rusage of that one
child, forked from a small interpreter (see `_SPAWN`).

Namespaces are named `<lab prefix>floor` and deleted in `finally`; nothing runs in the
host's namespace.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from benchmarks.backends import Backend

TOUCHES = 5


@dataclass
class Floor:
    """One floor measurement (seconds, MiB)."""

    seconds: float | None = None
    tool_peak_mib: float | None = None
    expected_endpoints: int = 0
    read_back_endpoints: int = 0
    ok: bool = False
    detail: str = ""
    touch_seconds: list[float] = field(default_factory=list)

    @property
    def touch_median(self) -> float | None:
        return statistics.median(self.touch_seconds) if self.touch_seconds else None


# Runs the tool as a child of a small interpreter and reports (seconds, peak KiB, exit
# code) on stderr's last line. Not `os.wait4` on a child of this process: a forked
# child inherits its parent's peak RSS into ru_maxrss (kept across exec), so every tool
# started from the harness (about 80 MiB) would report at least that.
_SPAWN = """
import os, sys, time
began = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
elapsed = time.perf_counter() - began
sys.stderr.write(f"\\nKPY-SPAWN {elapsed} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}\\n")
"""


def timed_tool(netns: str, argv: Sequence[str], text: str) -> tuple[float, float, int, str]:
    """Run `argv` in `netns` with `text` on stdin (from a file, as the tools read it).

    Returns (seconds, peak RSS MiB of the tool, exit code, stderr). The time is taken
    around the tool alone (fork, exec, wait), inside the namespace.
    """
    with tempfile.TemporaryFile("w+b") as stdin:
        stdin.write(text.encode())
        stdin.seek(0)
        done = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-I", "-S", "-c", _SPAWN, *argv],
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    head, _, last = done.stderr.rstrip().rpartition("\n")
    words = last.split()
    if len(words) != 4 or words[0] != "KPY-SPAWN":
        return 0.0, 0.0, done.returncode or 1, done.stderr[-500:]
    return float(words[1]), int(words[2]) / 1024, int(words[3]), head[-500:]


def load_and_check(
    netns: str,
    backend: Backend,
    text: str,
    expected: int,
    count: Callable[[str], int],
    *,
    touch: bool,
) -> Floor:
    """Load `text` into a fresh `netns`, count it back, optionally time the touch."""
    floor = Floor(expected_endpoints=expected)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        seconds, peak, code, err = timed_tool(netns, backend.restore, text)
        if code != 0:
            floor.detail = f"{backend.restore[0]} exited {code}: {err}"
            return floor
        saved = subprocess.run(
            ["ip", "netns", "exec", netns, *backend.save],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        floor.read_back_endpoints = count(saved)
        if floor.read_back_endpoints != expected:
            floor.detail = f"read back {floor.read_back_endpoints} endpoints, expected {expected}"
            return floor
        floor.seconds, floor.tool_peak_mib, floor.ok = seconds, peak, True
        if touch and backend.touch:
            for _ in range(TOUCHES):
                took, _, code, err = timed_tool(netns, backend.touch_tool, backend.touch)
                if code != 0:
                    floor.detail = f"touch failed: {err}"
                    break
                floor.touch_seconds.append(took)
        return floor
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def kernel_floor(prefix: str, backend: Backend, saved: str, expected: int) -> Floor:
    """The raw tool restoring the ruleset our proxy wrote (as read back) into a fresh netns."""
    return load_and_check(f"{prefix}floor", backend, saved, expected, backend.count, touch=True)


def upstream_floor(
    prefix: str, backend: Backend, text: str, expected: int, count: Callable[[str], int]
) -> Floor:
    """The raw tool restoring upstream's layout of the same services into a fresh netns."""
    return load_and_check(f"{prefix}floor", backend, text, expected, count, touch=False)
