"""The iptables backend: desired state -> one `iptables-restore --noflush` per sync.

Design:

- Rendering is pure (`proxy.backends.iptables.render`); this module decides *what*
  to write at each sync and talks to the tools through `proxy.kernel.iptables`.
- Every port's rendered chunk is memoised by its `ServicePortState` value, and the
  chunks of the last successful sync are remembered (`_written`). A partial sync
  rewrites the top-level chains (they list every port) plus the chains of ports
  whose chunk differs from what was written, and deletes chains of ports or
  endpoints that went away. The memory is only trusted after a success; any failure
  forgets it, so the next sync is full whatever the hint says. What to rewrite is
  decided by comparing chunks, not by `hint.changed`: a port named there whose rules
  come out identical (say only `all_endpoints` changed) is not rewritten, and a port
  whose state changed without being named is rewritten anyway.
- A full sync reads the KPY- chains that exist (`iptables-save -t nat/filter`),
  rewrites every chain of ours, deletes the ones no longer wanted, and inserts the
  jump rules from the built-in chains that are missing (seen in that saved output,
  or else confirmed with `iptables -C`) within the same restore, never twice.
- Only chains named KPY-* are ever written, flushed or deleted; the only rules we
  put into built-in chains are the `JUMP_RULES`.

iptables-restore commits each `*table` section on its own (measured with 1.8.9):
filter is written before nat, and a nat failure after a committed filter section is
repaired by the full sync that follows.

Concurrency: the proxier calls `sync`, `cleanup` and `drifted` from its single sync
thread; each call blocks on the tools it runs (bounded by the xtables lock wait and
the runner's timeout). No locking is needed here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

from proxy.backends.base import Backend, BackendConfig, BackendError, register
from proxy.backends.iptables import render
from proxy.kernel.commands import CommandRunner, SubprocessRunner
from proxy.kernel.iptables import (
    MODE_ENV,
    Iptables,
    IptablesError,
    IptablesTools,
    RestoreError,
    Variant,
    chains_in_save,
    detect_variant,
)
from proxy.model import ProxyState, ServicePortName, ServicePortState, SyncHint

log = logging.getLogger(__name__)

OFFENDING_CONTEXT = 2
"""Lines shown on either side of the input line iptables-restore refused."""
MAX_JUMP_DELETES = 16
"""Bound on `-D` repetitions per jump rule during cleanup (duplicates someone else made)."""


def offending_lines(text: str, line: int | None, radius: int = OFFENDING_CONTEXT) -> list[str]:
    """The refused input line and its neighbours, numbered like the tool numbers them."""
    if line is None:
        return []
    lines = text.splitlines()
    first = max(1, line - radius)
    last = min(len(lines), line + radius)
    return [f"{number}: {lines[number - 1]}" for number in range(first, last + 1)]


class IptablesBackend:
    """Programs Services with iptables chains named KPY-*.

    `runner` runs the tools (a `SubprocessRunner` in the configured namespace unless
    a test injects a fake); `environ` is read for `KPY_IPTABLES_MODE` when the
    config names no variant; `clock` times the phases for the debug log.
    """

    name = "iptables"

    def __init__(
        self,
        config: BackendConfig,
        runner: CommandRunner | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._runner = runner if runner is not None else SubprocessRunner(config.netns)
        self._clock = clock
        self._environ = MappingProxyType(dict(os.environ if environ is None else environ))
        forced = config.variant or self._environ.get(MODE_ENV, "").strip().lower() or None
        if forced is not None and forced not in {v.value for v in Variant}:
            raise ValueError(f"iptables variant {forced!r} is not one of nft, legacy")
        self._forced: Variant | None = Variant(forced) if forced else None
        self._ipt: Iptables | None = None

        self._cache: dict[ServicePortName, tuple[ServicePortState, render.PortRules]] = {}
        self._written: dict[ServicePortName, render.PortRules] | None = None
        """Chunks of the last successful sync; None means the next sync must be full."""
        self._context: render.RenderContext | None = None

    # -- tools -------------------------------------------------------------------------

    @property
    def variant(self) -> Variant:
        """The iptables variant in use (detected on first use when not configured)."""
        return self._tools().tools.variant

    def _tools(self) -> Iptables:
        if self._ipt is None:
            if self._forced is not None:
                variant, why = self._forced, "configured"
            else:
                variant, why = detect_variant(self._runner, self._config.family, self._environ)
            tools = IptablesTools(self._config.family, variant)
            log.info("iptables backend uses %s (%s)", tools.restore, why)
            self._ipt = Iptables(self._runner, tools)
        return self._ipt

    # -- sync --------------------------------------------------------------------------

    def _port_rules(
        self, name: ServicePortName, state: ServicePortState, ctx: render.RenderContext
    ) -> render.PortRules:
        cached = self._cache.get(name)
        if cached is not None and (cached[0] is state or cached[0] == state):
            return cached[1]
        rules = render.render_port(name, state, ctx)
        self._cache[name] = (state, rules)
        return rules

    def sync(self, state: ProxyState, hint: SyncHint) -> None:
        """Render what changed (everything when full) and write it in one restore."""
        started = self._clock()
        ipt = self._tools()
        ctx = render.RenderContext.build(
            state.node, family=self._config.family, masquerade_bit=self._config.masquerade_bit
        )
        if ctx != self._context:
            self._cache.clear()
        written = self._written
        full = hint.full or written is None or ctx != self._context

        current = {
            name: self._port_rules(name, port_state, ctx)
            for name, port_state in state.services.items()
        }
        for gone in self._cache.keys() - current.keys():
            del self._cache[gone]
        ports = list(current.values())

        # Forget what was written until this write succeeds: after any failure the
        # kernel may hold part of it (tables commit one by one), so sync fully next.
        self._written = None
        try:
            if full or written is None:
                text = self._full_input(ipt, ctx, ports)
            else:
                text = self._partial_input(ctx, current, written)
            rendered = self._clock()
            self._restore(ipt, text)
        except IptablesError as err:
            raise BackendError(str(err)) from err

        self._written = current
        self._context = ctx
        log.debug(
            "%s sync of %d ports: render %.1f ms, restore %.1f ms, %d bytes",
            "full" if full else "partial",
            len(current),
            (rendered - started) * 1000,
            (self._clock() - rendered) * 1000,
            len(text),
        )

    def _full_input(
        self, ipt: Iptables, ctx: render.RenderContext, ports: list[render.PortRules]
    ) -> str:
        wanted_nat = set(render.static_nat_chains(ctx))
        for rules in ports:
            wanted_nat.update(rules.nat_chains)
        wanted_filter = set(render.static_filter_chains())
        saved = {table: ipt.save(table) for table in ("nat", "filter")}
        existing = {table: ours(text) for table, text in saved.items()}
        return render.render_restore(
            full=True,
            ctx=ctx,
            ports=ports,
            write=ports,
            delete_nat=[chain for chain in existing["nat"] if chain not in wanted_nat],
            delete_filter=[chain for chain in existing["filter"] if chain not in wanted_filter],
            insert_jumps=self._missing_jumps(ipt, saved),
        )

    @staticmethod
    def _missing_jumps(ipt: Iptables, saved: Mapping[str, str]) -> list[render.JumpRule]:
        """Jump rules not in their built-in chain, so never inserted twice.

        A rule found verbatim in the saved table is there; otherwise `iptables -C`
        decides (it compares rules, not text, should a tool print them differently).
        """
        lines = {table: set(text.splitlines()) for table, text in saved.items()}
        return [
            jump
            for jump in render.JUMP_RULES
            if render.jump_line(jump) not in lines[jump.table]
            and not ipt.has_rule(jump.table, jump.chain, jump.spec)
        ]

    @staticmethod
    def _partial_input(
        ctx: render.RenderContext,
        current: dict[ServicePortName, render.PortRules],
        written: dict[ServicePortName, render.PortRules],
    ) -> str:
        dirty: list[render.PortRules] = []
        delete: list[str] = []
        for name, rules in current.items():
            old = written.get(name)
            if old is rules or old == rules:
                continue
            dirty.append(rules)
            if old is not None:
                keep = set(rules.nat_chains)
                delete.extend(chain for chain in old.nat_chains if chain not in keep)
        for name in written.keys() - current.keys():
            delete.extend(written[name].nat_chains)
        return render.render_restore(
            full=False, ctx=ctx, ports=list(current.values()), write=dirty, delete_nat=delete
        )

    def _restore(self, ipt: Iptables, text: str) -> None:
        try:
            ipt.restore(text)
        except RestoreError as err:
            lines = offending_lines(text, err.line)
            hint = ""
            if lines and err.line is not None and text.splitlines()[err.line - 1] == "COMMIT":
                hint = " (legacy iptables names the COMMIT line for errors found at commit)"
            raise BackendError(f"{err}{hint}", offending_lines=lines) from err

    # -- drift and cleanup -------------------------------------------------------------

    def drifted(self) -> bool:
        """True when the mangle canary chain is gone (someone flushed the tables)."""
        try:
            return not self._tools().chain_exists("mangle", render.CANARY)
        except IptablesError as err:
            log.warning("cannot check the iptables canary: %s", err)
            return False

    def cleanup(self) -> bool:
        """Remove our jump rules, then every KPY- chain, in the variant(s) in use.

        Without a configured or forced variant both are cleaned, so `--cleanup` also
        removes what an earlier run left in the other one.
        """
        self._written = None
        self._cache.clear()
        targets = [self._forced] if self._forced is not None else [Variant.NFT, Variant.LEGACY]
        removed = False
        for variant in targets:
            tools = IptablesTools(self._config.family, variant)
            if self._forced is None and self._runner.run([tools.save]).returncode == 127:
                continue  # this variant's tools are not installed
            try:
                removed |= self._cleanup_variant(Iptables(self._runner, tools))
            except IptablesError as err:
                raise BackendError(f"cleanup of {tools.restore} rules failed: {err}") from err
        return removed

    def _cleanup_variant(self, ipt: Iptables) -> bool:
        removed = False
        for jump in render.JUMP_RULES:
            for _ in range(MAX_JUMP_DELETES):
                if not ipt.delete_rule(jump.table, jump.chain, jump.spec):
                    break
                removed = True
        chains = {
            table: ours_in_table(chains)
            for table, chains in chains_in_save(ipt.save()).items()
            if table in ("nat", "filter", "mangle")
        }
        text = render.render_cleanup(chains)
        if text:
            self._restore(ipt, text)
            removed = True
        if removed:
            log.info("removed iptables rules of ours from %s", ipt.tools.restore)
        return removed


def ours_in_table(chains: list[str]) -> list[str]:
    return [chain for chain in chains if chain.startswith(render.PREFIX)]


def ours(save_text: str) -> list[str]:
    """Our chains in one table's `iptables-save` output."""
    return [
        chain for chains in chains_in_save(save_text).values() for chain in ours_in_table(chains)
    ]


@register("iptables")
def create_iptables_backend(config: BackendConfig) -> Backend:
    """Registry factory: the real tools, run in `config.netns` when set."""
    return IptablesBackend(config)
