"""The nftables backend: desired state -> one nft transaction per sync.

Design:

- Rendering is pure (`proxy.backends.nftables.render`, which also explains the table
  layout and why it was chosen); this module decides what to write and runs it
  through `proxy.kernel.nft` (libnftables in-process, else `nft -f -`).
- One transaction per sync, atomic in the kernel: a refused script leaves the
  ruleset exactly as it was, and the `BackendError` carries the refused line and its
  neighbours. Memory is updated only after the kernel accepted a script; any
  failure clears `_in_sync`, so the next sync is full whatever the hint says.
- A full sync replaces the whole table (`add table; delete table; add table; ...`
  in the same transaction): it converges from anything, including a table someone
  edited, without reading the kernel back.
- A partial sync renders the changed ports' previous states (`hint.previous`: as
  long as the last sync succeeded, that is what the kernel holds for them) and their
  new states, and writes the difference as element operations. A new shared dnat
  chain (`cluster-N` for a first service with N endpoints) is the only rule a
  partial sync can add. Nothing is read back: the work is in proportion to the change.
- Memory kept between syncs: the shared dnat chains that exist (a few dozen names)
  and, per endpoint address, how many service ports use it (the hairpin set holds
  one element per address; it goes when the last port using it goes).
- `drifted()` reads the chain names (`list chains`) and looks for our canary chain;
  it never lists the table (at 10k services that costs 2-3 s, see proxy.kernel.nft).

Measured (nft 1.0.6, kernel 6.18, 10k services x 10 endpoints, see
`proxy.kernel.nft` and `proxy.backends.nftables.render`): the full table loads in
2.2-2.5 s; one endpoint replaced is four element operations, 0.5 ms in-process.

Concurrency: the proxier calls `sync`, `cleanup` and `drifted` from its single sync
thread; each call blocks until the kernel answered.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from proxy.backends.base import Backend, BackendConfig, BackendError, register
from proxy.backends.nftables import render
from proxy.kernel.commands import CommandRunner, SubprocessRunner
from proxy.kernel.nft import (
    Nft,
    NftError,
    NftLibrary,
    NftProcess,
    apply,
    chains_by_table,
    open_nft,
)
from proxy.model import IPFamily, ProxyState, SyncHint

log = logging.getLogger(__name__)

LARGE_SCRIPT_BYTES = 1 << 20
"""A full-sync script above this size goes to `nft -f -` rather than the library."""

OFFENDING_CONTEXT = 2
"""Script lines shown on either side of the line nft refused."""


def offending_lines(text: str, line: int | None, radius: int = OFFENDING_CONTEXT) -> list[str]:
    """The refused script line and its neighbours, numbered like nft numbers them."""
    if line is None:
        return []
    lines = text.splitlines()
    first = max(1, line - radius)
    last = min(len(lines), line + radius)
    return [f"{number}: {lines[number - 1][:400]}" for number in range(first, last + 1)]


class NftablesBackend:
    """Programs Services into the nftables table `kube-proxy-py` of our family.

    `nft` runs the scripts (libnftables in `config.netns` unless a test injects a fake,
    e.g. `NftProcess(FakeNft())`); `clock` times the phases.
    """

    name = "nftables"

    def __init__(
        self,
        config: BackendConfig,
        nft: Nft | None = None,
        *,
        runner: CommandRunner | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._runner = runner if runner is not None else SubprocessRunner(config.netns)
        self._nft = nft
        self._clock = clock
        self._in_sync = False
        """The kernel holds the state of the last successful sync; False: sync fully."""
        self._context: render.RenderContext | None = None
        self._chains: dict[str, int] = {}
        """Shared dnat chain in the kernel -> service ports whose elements jump to it."""
        self._hairpin: dict[str, int] = {}
        """Endpoint address -> service ports using it (its @hairpin element exists)."""

    def _tool(self) -> Nft:
        if self._nft is None:
            self._nft = open_nft(self._config.netns, self._runner)
        return self._nft

    def _context_for(self, state: ProxyState) -> render.RenderContext:
        return render.RenderContext.build(
            state.node, family=self._config.family, masquerade_bit=self._config.masquerade_bit
        )

    # -- sync --------------------------------------------------------------------------

    def sync(self, state: ProxyState, hint: SyncHint) -> None:
        """Write what changed (everything when full); see the module docstring."""
        ctx = self._context_for(state)
        full = hint.full or not self._in_sync or ctx != self._context
        self._in_sync = False
        if full:
            self._sync_full(ctx, state)
        else:
            self._sync_partial(ctx, state, hint)
        self._in_sync = True
        self._context = ctx

    def _sync_full(self, ctx: render.RenderContext, state: ProxyState) -> None:
        started = self._clock()
        ports = [render.render_port(port_state, ctx) for port_state in state.services.values()]
        hairpin: Counter[str] = Counter()
        for port in ports:
            hairpin.update(port.hairpin)
        script = render.render_full(ports, ctx, hairpin)
        rendered = self._clock()
        self._apply(script, large=len(script) > LARGE_SCRIPT_BYTES)
        written = self._clock()
        chains: Counter[str] = Counter()
        for port in ports:
            chains.update(port.chains)
        self._chains = dict(chains)
        self._hairpin = dict(hairpin)
        self._report("full", len(ports), rendered - started, written - rendered, script)

    def _sync_partial(self, ctx: render.RenderContext, state: ProxyState, hint: SyncHint) -> None:
        started = self._clock()
        old: list[render.Element] = []
        new: list[render.Element] = []
        old_ports: list[render.PortElements] = []
        new_ports: list[render.PortElements] = []
        delta: Counter[str] = Counter()
        chain_delta: Counter[str] = Counter()
        for name in sorted(hint.changed):  # sorted: the same script for the same change
            before = hint.previous.get(name)
            after = state.services.get(name)
            if before is not None:
                rendered_before = render.render_port(before, ctx)
                old_ports.append(rendered_before)
                old.extend(rendered_before.elements)
                delta.subtract(rendered_before.hairpin)
                chain_delta.subtract(rendered_before.chains)
            if after is not None:
                rendered_after = render.render_port(after, ctx)
                new_ports.append(rendered_after)
                new.extend(rendered_after.elements)
                delta.update(rendered_after.hairpin)
                chain_delta.update(rendered_after.chains)
        counts = _recount(self._hairpin, delta)
        for address, (had, now) in counts.items():
            if had == 0:
                new.append(render.hairpin_element(address))
            elif now == 0:
                old.append(render.hairpin_element(address))
        chain_counts = _recount(self._chains, chain_delta)
        added = [chain for chain, (had, now) in chain_counts.items() if had == 0 and now > 0]
        gone = [chain for chain, (had, now) in chain_counts.items() if had > 0 and now == 0]
        change_set = render.element_change(old, new)
        script = render.render_partial(
            ctx=ctx,
            new_chains=added,
            change=change_set,
            gone_chains=gone,
            owned=render.OwnedChange.of(old_ports, new_ports),
        )
        rendered = self._clock()
        if script:
            self._apply(script)
        written = self._clock()
        _commit(self._hairpin, counts)
        _commit(self._chains, chain_counts)
        self._report("partial", len(hint.changed), rendered - started, written - rendered, script)

    def _apply(self, script: str, *, large: bool = False) -> None:
        tool = self._tool()
        if large and isinstance(tool, NftLibrary):
            # libnftables holds its parse of the whole script in our heap (RSS peaked at
            # 382 MiB for the 8 MB table of 10k x 10); a process keeps that peak in the
            # child, and loads a full table as fast (measured 2.8 s against 2.5 s).
            tool = NftProcess(self._runner)
        try:
            apply(tool, script)
        except NftError as err:
            raise BackendError(
                f"nft refused the transaction: {err}",
                offending_lines=offending_lines(script, err.line),
            ) from err

    def _report(self, kind: str, ports: int, render_s: float, write_s: float, script: str) -> None:
        self._config.metrics.observe_phase("render", render_s)
        self._config.metrics.observe_phase("write", write_s)
        log.debug(
            "%s nftables sync of %d ports: render %.1f ms, write %.1f ms (%d bytes)",
            kind,
            ports,
            render_s * 1000,
            write_s * 1000,
            len(script),
        )

    # -- drift and cleanup -------------------------------------------------------------

    def _chains_by_table(self) -> dict[str, set[str]] | None:
        """Every table and its chain names, from `list chains` (cheap: see proxy.kernel.nft)."""
        listed = self._tool().execute("list chains\n")
        if not listed.ok:
            log.warning("nft list chains failed: %s", listed.error.strip())
            return None
        return chains_by_table(listed.output)

    def drifted(self) -> bool:
        """True when our canary chain is gone (the table was deleted or the ruleset flushed).

        Reads chain names only, never the table's rules or elements.
        """
        tables = self._chains_by_table()
        if tables is None:
            return False
        return render.CANARY not in tables.get(_table(self._config.family), set())

    def cleanup(self) -> bool:
        """Delete our table in both families (`ip` and `ip6 kube-proxy-py`), nothing else."""
        self._in_sync = False
        self._chains = {}
        self._hairpin = {}
        tables = self._chains_by_table()
        if tables is None:
            raise BackendError("nft list chains failed: cannot tell whether our tables exist")
        removed = False
        for family in (IPFamily.V4, IPFamily.V6):
            ctx = render.RenderContext(family, "", (), masquerade_all=False, nodeport_scope=None)
            if ctx.table not in tables:
                continue
            try:
                apply(self._tool(), render.render_cleanup(ctx))
            except NftError as err:
                raise BackendError(f"deleting table {ctx.table} failed: {err}") from err
            log.info("deleted nftables table %s", ctx.table)
            removed = True
        return removed


def _table(family: IPFamily) -> str:
    """Our table's family and name as nft spells them, e.g. "ip kube-proxy-py"."""
    return render.RenderContext(family, "", (), masquerade_all=False, nodeport_scope=None).table


def _recount(counts: dict[str, int], delta: Counter[str]) -> dict[str, tuple[int, int]]:
    """name -> (count before, count after) for every name whose count changes.

    A count below zero means the hint or our memory is wrong: the `BackendError`
    makes the next sync a full one, which rebuilds the counts from scratch.
    """
    changed: dict[str, tuple[int, int]] = {}
    for name, change in delta.items():
        if change == 0:
            continue
        had = counts.get(name, 0)
        now = had + change
        if now < 0:
            raise BackendError(f"nftables: {name} would be used {now} times; syncing fully")
        changed[name] = (had, now)
    return changed


def _commit(counts: dict[str, int], changed: dict[str, tuple[int, int]]) -> None:
    """Apply `_recount`'s result, once the kernel accepted the script."""
    for name, (_, now) in changed.items():
        if now:
            counts[name] = now
        else:
            counts.pop(name, None)


@register("nftables")
def create_nftables_backend(config: BackendConfig) -> Backend:
    """Registry factory: libnftables (or `nft -f -`) in `config.netns` when set."""
    return NftablesBackend(config)
