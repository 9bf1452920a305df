"""Running kernel tools (iptables-restore, nft, ...) behind a small interface.

Backends never call `subprocess` themselves: they get a `CommandRunner`, so unit tests
can hand them a stateful fake that parses what it is given and rejects what the
kernel would, and kernel tests can run the same code inside a network namespace.

Input can be a string or an iterable of strings. An iterable is written to the tool
as it is produced: a full sync at 10k services renders 30 MB of `iptables-restore`
input, and streaming it lets the tool parse while we render (two CPUs busy instead of
one after the other) without ever holding the whole text, or its encoded copy, in
memory.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

Input = str | Iterable[str]
"""What a tool reads on stdin: one text, or chunks written as they are produced."""


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

    def run(self, argv: Sequence[str], *, stdin: Input | None = None) -> CommandResult: ...


def joined(stdin: Input | None) -> str | None:
    """The whole input as one text (for fakes and error reports)."""
    if stdin is None or isinstance(stdin, str):
        return stdin
    return "".join(stdin)


class SubprocessRunner:
    """Runs tools on this host, optionally inside a named network namespace."""

    def __init__(self, netns: str | None = None, timeout: float = 300.0) -> None:
        self._prefix: tuple[str, ...] = ("ip", "netns", "exec", netns) if netns else ()
        self._timeout = timeout

    def run(self, argv: Sequence[str], *, stdin: Input | None = None) -> CommandResult:
        full = (*self._prefix, *argv)
        if stdin is None or isinstance(stdin, str):
            return self._run_text(full, stdin)
        return self._run_streamed(full, stdin)

    def _run_text(self, full: tuple[str, ...], stdin: str | None) -> CommandResult:
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
            return CommandResult(full, 127, "", f"{full[0]}: not found ({err})")
        except subprocess.TimeoutExpired:
            return CommandResult(full, 124, "", f"timed out after {self._timeout}s")
        return CommandResult(full, done.returncode, done.stdout, done.stderr)

    def _run_streamed(self, full: tuple[str, ...], chunks: Iterable[str]) -> CommandResult:
        """Write `chunks` as they come. Output goes to files, not pipes, so a tool that
        prints a lot while we write can never block us (nor we it)."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            try:
                proc = subprocess.Popen(
                    full, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True
                )
            except FileNotFoundError as error:
                return CommandResult(full, 127, "", f"{full[0]}: not found ({error})")
            timed_out = threading.Event()

            def kill() -> None:
                timed_out.set()
                proc.kill()

            watchdog = threading.Timer(self._timeout, kill)
            watchdog.daemon = True
            watchdog.start()
            try:
                _feed(proc.stdin, chunks)
                returncode = proc.wait()
            finally:
                watchdog.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if timed_out.is_set():
                return CommandResult(full, 124, "", f"timed out after {self._timeout}s")
            return CommandResult(full, returncode, _read(out), _read(err))


def _feed(pipe: IO[str] | None, chunks: Iterable[str]) -> None:
    assert pipe is not None
    try:
        for chunk in chunks:
            pipe.write(chunk)
    except BrokenPipeError:
        pass  # the tool stopped reading (it failed): its exit status and stderr tell why
    finally:
        with contextlib.suppress(BrokenPipeError):
            pipe.close()


def _read(handle: IO[str]) -> str:
    handle.seek(0)
    return handle.read()
