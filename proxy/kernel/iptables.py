"""The iptables tools (restore, save, single-rule commands) behind a `CommandRunner`.

This module knows how to call `iptables-restore`, `iptables-save` and `iptables`
for one family (iptables / ip6tables) and one variant (nf_tables or legacy), how to
read their answers, and how to pick a variant the way upstream's iptables-wrapper
does. It knows nothing about Services: `proxy.backends.iptables` decides what to
write.

Facts measured with iptables 1.8.9 in a network namespace, which shape the code:

- `iptables-restore` commits per `*table ... COMMIT` section: when the nat section
  fails, an earlier filter section of the same input stays committed. Each table is
  atomic, the input as a whole is not.
- Errors name a line in several spellings: legacy `iptables-restore: line N failed`
  (N is the COMMIT line for errors found at commit), nft `line N: RULE_APPEND failed`,
  both `Error occurred at line: N` for parse errors and `COMMIT expected at line N`.
- Exit status 4 means "resource problem": a held xtables lock, but also any
  kernel refusal from iptables-nft. Only the message tells a lock timeout apart.
- Exit status 1 (or 2 when the target chain is gone) from `-C`/`-D` means "no such
  rule".

Concurrency: every call blocks the caller until the tool exits (up to the runner's
timeout; `-w` makes a tool wait for the xtables lock first). The backend calls this
from the proxier's single sync thread only.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from proxy.kernel.commands import CommandResult, CommandRunner
from proxy.model import IPFamily

log = logging.getLogger(__name__)

InputSource = str | Callable[[], Iterable[str]]
"""A restore input: a text, or a function producing its chunks (called once per attempt)."""

MODE_ENV = "KPY_IPTABLES_MODE"
"""Environment variable forcing the variant when none is configured ("nft" or "legacy")."""

LOCK_WAIT_SECONDS = 5
"""How long each tool waits for the xtables lock (`-w`) before giving up."""

_LOCK_MESSAGE = re.compile(r"xtables lock|holding the lock", re.IGNORECASE)
_LINE_NUMBER = re.compile(r"\bline:? (\d+)\b")
_MISSING_RULE_CODES = frozenset({1, 2})


class Variant(enum.StrEnum):
    """Which kernel API the iptables tools drive."""

    NFT = "nft"
    LEGACY = "legacy"


class IptablesError(Exception):
    """A tool failed; `result` holds what it printed."""

    def __init__(self, message: str, result: CommandResult) -> None:
        super().__init__(message)
        self.result = result


class IptablesLockError(IptablesError):
    """Another process held the xtables lock for longer than we wait."""


class RestoreError(IptablesError):
    """`iptables-restore` refused its input; `line` is the 1-based input line it named."""

    def __init__(self, message: str, result: CommandResult, line: int | None) -> None:
        super().__init__(message, result)
        self.line = line


@dataclass(frozen=True, slots=True)
class IptablesTools:
    """The three executables of one family and variant."""

    family: IPFamily
    variant: Variant

    @property
    def _stem(self) -> str:
        base = "ip6tables" if self.family is IPFamily.V6 else "iptables"
        return f"{base}-{self.variant.value}"

    @property
    def iptables(self) -> str:
        return self._stem

    @property
    def restore(self) -> str:
        return f"{self._stem}-restore"

    @property
    def save(self) -> str:
        return f"{self._stem}-save"


def failed_line(stderr: str) -> int | None:
    """The input line number an `iptables-restore` error message names, if any."""
    match = _LINE_NUMBER.search(stderr)
    return int(match.group(1)) if match else None


def is_lock_timeout(result: CommandResult) -> bool:
    return result.returncode == 4 and bool(_LOCK_MESSAGE.search(result.stderr))


def chains_in_save(text: str) -> dict[str, list[str]]:
    """Chain names per table, in order, from `iptables-save` output."""
    chains: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = chains.setdefault(line[1:].strip(), [])
        elif line.startswith(":") and current is not None:
            current.append(line[1:].split(" ", 1)[0])
        elif line.startswith("COMMIT"):
            current = None
    return chains


def count_rules(text: str) -> int:
    """How many rules (`-A` lines) an `iptables-save` output holds."""
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


class Iptables:
    """One family and variant of the iptables tools, run through a `CommandRunner`.

    Example (with a runner that records what it runs)::

        ipt = Iptables(runner, IptablesTools(IPFamily.V4, Variant.NFT))
        ipt.restore("*nat\\n:KPY-SERVICES - [0:0]\\n-I PREROUTING 1 -j KPY-SERVICES\\nCOMMIT\\n")
        assert ipt.has_rule("nat", "PREROUTING", ("-j", "KPY-SERVICES"))
        ipt.delete_rule("nat", "PREROUTING", ("-j", "KPY-SERVICES"))
    """

    def __init__(
        self,
        runner: CommandRunner,
        tools: IptablesTools,
        *,
        lock_wait: int = LOCK_WAIT_SECONDS,
        lock_attempts: int = 2,
    ) -> None:
        self._runner = runner
        self.tools = tools
        self._wait = ("-w", str(lock_wait))
        self._lock_wait = lock_wait
        self._lock_attempts = max(1, lock_attempts)

    def _run(self, argv: Sequence[str], *, stdin: InputSource | None = None) -> CommandResult:
        """Run a tool, retrying while the xtables lock is held by someone else.

        A streamed input is produced anew for each attempt (a generator can be read once).
        """

        def attempt() -> CommandResult:
            given = stdin if stdin is None or isinstance(stdin, str) else stdin()
            return self._runner.run(argv, stdin=given)

        result = attempt()
        attempts = 1
        while is_lock_timeout(result) and attempts < self._lock_attempts:
            log.warning("xtables lock busy for %d s, retrying %s", self._lock_wait, argv[0])
            result = attempt()
            attempts += 1
        if is_lock_timeout(result):
            raise IptablesLockError(
                f"{argv[0]}: xtables lock held by another process; gave up after "
                f"{attempts} attempts of {self._lock_wait} s",
                result,
            )
        return result

    # -- whole tables --------------------------------------------------------------------

    def restore(self, text: InputSource, *, noflush: bool = True) -> None:
        """Feed `text`, or the chunks `text()` yields (streamed), to iptables-restore;
        each `*table` section commits on its own."""
        argv = [self.tools.restore, *self._wait]
        if noflush:
            argv.append("--noflush")
        result = self._run(argv, stdin=text)
        if not result.ok:
            detail = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
            raise RestoreError(
                f"{self.tools.restore} failed: {detail}", result, failed_line(result.stderr)
            )

    def save(self, table: str | None = None) -> str:
        """`iptables-save` of one table (or all); empty when the tool has no tables."""
        argv = [self.tools.save] if table is None else [self.tools.save, "-t", table]
        result = self._run(argv)
        if not result.ok:
            raise IptablesError(f"{self.tools.save} failed: {result.stderr.strip()}", result)
        return result.stdout

    # -- single rules --------------------------------------------------------------------

    def _rule_command(
        self, table: str, op: str, chain: str, spec: Sequence[str], *extra: str
    ) -> CommandResult:
        return self._run([self.tools.iptables, *self._wait, "-t", table, op, chain, *extra, *spec])

    def has_rule(self, table: str, chain: str, spec: Sequence[str]) -> bool:
        """`iptables -C`: is this exact rule in `chain`?"""
        result = self._rule_command(table, "-C", chain, spec)
        if result.ok:
            return True
        if result.returncode in _MISSING_RULE_CODES:
            return False
        raise IptablesError(f"checking a rule in {table}/{chain}: {result.stderr.strip()}", result)

    def delete_rule(self, table: str, chain: str, spec: Sequence[str]) -> bool:
        """`iptables -D` once; False when there was no such rule (or no such table)."""
        result = self._rule_command(table, "-D", chain, spec)
        if result.ok:
            return True
        if result.returncode in _MISSING_RULE_CODES:
            return False
        raise IptablesError(
            f"deleting a rule from {table}/{chain}: {result.stderr.strip()}", result
        )

    def chain_exists(self, table: str, chain: str) -> bool:
        """`iptables -S chain`: does the chain exist (a lock timeout raises)?"""
        result = self._run([self.tools.iptables, *self._wait, "-t", table, "-S", chain])
        return result.ok


def detect_variant(
    runner: CommandRunner, family: IPFamily, environ: Mapping[str, str]
) -> tuple[Variant, str]:
    """Pick nft or legacy like upstream's iptables-wrapper; returns the choice and why.

    `KPY_IPTABLES_MODE` forces a variant. Otherwise the variant that already holds
    kube-proxy's or our chains (KUBE-*, KPY-*) wins, then the one holding more rules,
    so we join whatever the node's other components already use; nft by default.
    """
    forced = environ.get(MODE_ENV, "").strip().lower()
    if forced:
        try:
            return Variant(forced), f"{MODE_ENV}={forced}"
        except ValueError:
            raise ValueError(
                f"{MODE_ENV}={forced!r} is not a valid iptables mode (use nft or legacy)"
            ) from None
    found: dict[Variant, tuple[bool, int]] = {}
    for variant in (Variant.LEGACY, Variant.NFT):
        tools = IptablesTools(family, variant)
        result = runner.run([tools.save])
        if not result.ok:
            continue
        kube = any(line.startswith((":KUBE-", ":KPY-")) for line in result.stdout.splitlines())
        found[variant] = (kube, count_rules(result.stdout))
    with_kube = [variant for variant, (kube, _) in found.items() if kube]
    if len(with_kube) == 1:
        return with_kube[0], f"only {with_kube[0]} holds KUBE-/KPY- chains"
    legacy_rules = found.get(Variant.LEGACY, (False, 0))[1]
    nft_rules = found.get(Variant.NFT, (False, 0))[1]
    if legacy_rules > nft_rules:
        return Variant.LEGACY, f"legacy holds more rules ({legacy_rules} > {nft_rules})"
    if nft_rules > legacy_rules:
        return Variant.NFT, f"nft holds more rules ({nft_rules} > {legacy_rules})"
    return Variant.NFT, "default (no variant holds more rules)"
