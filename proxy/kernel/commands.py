"""Running kernel tools (iptables-restore, nft, ...) behind a small interface.

Backends never call `subprocess` themselves: they get a `CommandRunner`, so unit tests
can hand them a stateful fake that parses what it is given and rejects what the
kernel would, and kernel tests can run the same code inside a network namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Exit status and captured output of one tool invocation."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandRunner(Protocol):
    """Runs a tool to completion and returns what it printed."""

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult: ...


class SubprocessRunner:
    """Runs tools on this host, optionally inside a named network namespace."""

    def __init__(self, netns: str | None = None, timeout: float = 300.0) -> None:
        self._prefix: tuple[str, ...] = ("ip", "netns", "exec", netns) if netns else ()
        self._timeout = timeout

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
        full = (*self._prefix, *argv)
        try:
            done = subprocess.run(
                full,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self._timeout,
                check=False,
            )
        except FileNotFoundError as err:
            return CommandResult(tuple(full), 127, "", f"{full[0]}: not found ({err})")
        except subprocess.TimeoutExpired:
            return CommandResult(tuple(full), 124, "", f"timed out after {self._timeout}s")
        return CommandResult(tuple(full), done.returncode, done.stdout, done.stderr)
