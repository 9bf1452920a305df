"""The iptables backend: desired state -> `iptables-restore --noflush` inputs.

Design:

- Rendering is pure (`proxy.backends.iptables.render`); this module decides *what*
  to write at each sync and talks to the tools through `proxy.kernel.iptables`.
- No per-port memory: what the kernel holds for a port is what rendering its
  `hint.previous` state gives, as long as the last sync succeeded (`_in_sync`, only
  set after a successful write; any failure clears it, so the next sync is full
  whatever the hint says). At 10k services that saves the 100k chain names a
  record of our own output would keep.
- A partial sync trusts `hint.changed` (the seam's contract) and does work in
  proportion to it: it renders the changed ports (before and after), rewrites their
  chains when their rules differ, deletes the chains they no longer use, and edits the shared
  chains (nat KPY-SERVICES and KPY-NODEPORTS, filter KPY-SERVICES and
  KPY-EXTERNAL-SERVICES) rule by rule with `-D` / `-I` / `-A` instead of rewriting
  them. A table with nothing to do is left out of the input.
- A full sync renders every port, reads the KPY- chains that exist
  (`iptables-save -t nat/filter`, in a thread while rendering), rewrites every chain
  of ours, deletes the ones no longer wanted, and inserts the jump rules from the
  built-in chains that are missing (seen in that saved output, or else confirmed with
  `iptables -C`) within the same restore, never twice.
- Only chains named KPY-* are ever written, flushed or deleted; the only rules we
  put into built-in chains are the `JUMP_RULES`.

Kernel facts measured on this machine (iptables 1.8.9, kernel 6.18), which shape the
writes (reproduce with `python -m benchmarks.iptables_layout`):

- iptables-legacy replaces a whole table at each COMMIT: at 10k services x 10
  endpoints every nat commit costs 1.2-1.6 s however small the change. One input
  with one section per table is the cheapest.
- iptables-nft-restore's cost grows with the square of the chains created in one
  transaction: 2k services x 10 endpoints load in 31 s as one input but in 2.0 s as
  20 inputs of 100 services (10k x 10: 11 s, where upstream's single restore takes
  over 10 minutes). So with nft a full sync (or a large partial one) writes the
  static chains first, then the port chains in batches of about `NFT_BATCH_CHAINS`
  chains (a port's chains always commit together, so every packet sees each service
  either old or new), then the top-level chains, deletions and jumps last. A
  one-endpoint change costs 50 ms at 10k x 10 instead of 1.1 s when the top-level
  chains are rewritten, and `-D`/`-I` of one top-level rule 150 ms.
- iptables-restore commits each `*table` section on its own: filter is written
  before nat, and a failure after a committed section is repaired by the full sync
  that follows.

Localhost NodePorts (`--iptables-localhost-nodeports`, on by default, IPv4 only, and
off when `--nodeport-addresses` leaves out 127.0.0.1, as upstream): the NodePorts jump
also matches 127/8, and a full sync first ensures `net.ipv4.conf.all.route_localnet=1`
(upstream sets it when its proxier starts), without which the kernel drops the DNATed
packet whose source is 127.0.0.1. When that write is refused (an unprivileged
container; `--init-only` sets it from a privileged init container) the error is logged
once and the rest of the rules are written all the same: only 127.0.0.1:NodePort stays
dead, where upstream would refuse to start.

Large clusters: above `BackendConfig.large_cluster_endpoints` endpoints (upstream's
threshold, 1000) the per-endpoint rules are rendered without comments, as upstream's
large-cluster mode does; it only changes text, so crossing it needs no full sync.

Concurrency: the proxier calls `sync`, `cleanup` and `drifted` from its single sync
thread; each call blocks on the tools it runs (bounded by the xtables lock wait and
the runner's timeout). The one helper thread (reading the tables while a full sync
renders) is joined before `sync` returns.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
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
from proxy.kernel.sysctl import (
    ROUTE_LOCALNET,
    CommandTunables,
    ProcTunables,
    TunableError,
    Tunables,
)
from proxy.model import ProxyState, ServicePortName, ServicePortState, SyncHint

log = logging.getLogger(__name__)

OFFENDING_CONTEXT = 2
"""Lines shown on either side of the input line iptables-restore refused."""
MAX_JUMP_DELETES = 16
"""Bound on `-D` repetitions per jump rule during cleanup (duplicates someone else made)."""
NFT_BATCH_CHAINS = 1000
"""Chains created per iptables-nft-restore transaction (see the module docstring)."""


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
    config names no variant; `clock` times the phases. `localhost_nodeports` is
    `--iptables-localhost-nodeports`; `tunables` is where route_localnet is set (by
    default this process's /proc/sys, or the configured namespace's; with an injected
    runner and no namespace, nothing is touched unless a test passes its own).
    """

    name = "iptables"

    def __init__(
        self,
        config: BackendConfig,
        runner: CommandRunner | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
        localhost_nodeports: bool | None = None,
        tunables: Tunables | None = None,
    ) -> None:
        self._config = config
        self._localhost_nodeports = (
            config.localhost_nodeports if localhost_nodeports is None else localhost_nodeports
        )
        if tunables is None:
            if config.netns is not None:
                tunables = CommandTunables(SubprocessRunner(config.netns, timeout=30.0))
            elif runner is None:
                tunables = ProcTunables()
        self._tunables = tunables
        self._route_localnet = False
        """route_localnet is known to be 1 (checked once, on the first full sync that needs it)."""
        self._runner = runner if runner is not None else SubprocessRunner(config.netns)
        self._clock = clock
        self._environ = MappingProxyType(dict(os.environ if environ is None else environ))
        forced = config.variant or self._environ.get(MODE_ENV, "").strip().lower() or None
        if forced is not None and forced not in {v.value for v in Variant}:
            raise ValueError(f"iptables variant {forced!r} is not one of nft, legacy")
        self._forced: Variant | None = Variant(forced) if forced else None
        self._ipt: Iptables | None = None

        self._in_sync = False
        """The kernel holds the state of the last successful sync; False: sync fully."""
        self._context: render.RenderContext | None = None
        self._endpoints = 0
        """Endpoints of every port written, for the large-cluster threshold."""
        self._counts = (0, 0)
        """(nat, filter) rules of ours in the kernel, for the metric."""

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

    def unusable_reason(self) -> str | None:
        """None when this family's iptables tools work here (upstream's `Present()`)."""
        ipt = self._tools()
        listed = self._runner.run([ipt.tools.save, "-t", "nat"])
        if listed.ok:
            return None
        return f"{ipt.tools.save} -t nat failed: {listed.stderr.strip() or listed.returncode}"

    def _batched(self) -> bool:
        return self._tools().tools.variant is Variant.NFT

    # -- sync --------------------------------------------------------------------------

    def sync(self, state: ProxyState, hint: SyncHint) -> None:
        """Write what changed (everything when full); see the module docstring."""
        ipt = self._tools()
        ctx = render.RenderContext.build(
            state.node,
            family=self._config.family,
            masquerade_bit=self._config.masquerade_bit,
            localhost_nodeports=self._localhost_nodeports,
        )
        full = hint.full or not self._in_sync or ctx != self._context
        # Trust nothing until this write succeeds: after any failure the kernel may
        # hold part of it (tables and batches commit one by one).
        self._in_sync = False
        try:
            if full:
                self._sync_full(ipt, ctx, state)
            else:
                self._sync_partial(ipt, ctx, state, hint)
        except IptablesError as err:
            raise BackendError(str(err)) from err
        self._in_sync = True
        self._context = ctx
        nat, filter_ = self._counts
        self._config.metrics.set_iptables_rules("nat", nat)
        self._config.metrics.set_iptables_rules("filter", filter_)

    def _comments(self, endpoints: int) -> bool:
        return endpoints <= self._config.large_cluster_endpoints

    def _ensure_route_localnet(self) -> None:
        """route_localnet=1 for localhost NodePorts; a refusal is logged, not raised."""
        if self._route_localnet or self._tunables is None:
            return
        self._route_localnet = True  # one attempt, one log line, like upstream's start-up
        try:
            if self._tunables.read(ROUTE_LOCALNET) != 1:
                self._tunables.write(ROUTE_LOCALNET, 1)
                log.info(
                    "set %s = 1 for localhost NodePorts (turn off with "
                    "--iptables-localhost-nodeports=false or a --nodeport-addresses "
                    "without 127.0.0.1)",
                    ROUTE_LOCALNET,
                )
        except TunableError as err:
            log.error(
                "localhost NodePorts will not answer: %s (run --init-only in a privileged "
                "init container, or turn them off)",
                err,
            )

    def _sync_full(self, ipt: Iptables, ctx: render.RenderContext, state: ProxyState) -> None:
        if ctx.localhost_nodeports:
            self._ensure_route_localnet()
        started = self._clock()
        saved = {table: ipt.save(table) for table in ("nat", "filter")}
        existing = {table: ours(text) for table, text in saved.items()}
        wanted_filter = set(render.static_filter_chains())
        stale_filter = [chain for chain in existing["filter"] if chain not in wanted_filter]
        # Before the restore starts: `iptables -C` would wait for the lock it holds.
        jumps = self._missing_jumps(ipt, saved)
        del saved
        read = self._clock()
        endpoints = sum(len(port.all_endpoints) for port in state.services.values())
        comments = self._comments(endpoints)

        def ports() -> Iterator[render.PortRules]:
            for name, port_state in state.services.items():
                yield render.render_port(name, port_state, ctx, endpoint_comments=comments)

        shared = render.SharedLines()
        if self._batched():
            stale_nat = self._restore_batched(ipt, ctx, ports(), shared, existing["nat"])
            last = render.render_shared(
                ctx=ctx,
                shared=shared,
                delete_nat=stale_nat,
                delete_filter=stale_filter,
                insert_jumps=jumps,
            )
            self._restore(ipt, last)
        else:
            declared = sorted(
                {
                    chain
                    for name, port_state in state.services.items()
                    for chain in render.port_chains(name, port_state, ctx)
                }
            )
            wanted = {*declared, *render.static_nat_chains(ctx)}
            stale_nat = [chain for chain in existing["nat"] if chain not in wanted]
            del wanted

            def stream(lines: render.SharedLines) -> Iterator[str]:
                return render.stream_full(
                    ctx=ctx,
                    chains=declared,
                    ports=ports(),
                    shared=lines,
                    stale_nat=stale_nat,
                    stale_filter=stale_filter,
                    insert_jumps=jumps,
                )

            # The rules are rendered while the tool parses what it already has.
            self._restore(ipt, lambda: stream(shared), replay=lambda: stream(render.SharedLines()))
        written = self._clock()
        self._endpoints = endpoints
        nat, filter_ = render.static_rule_counts(ctx)
        self._counts = (nat + shared.nat_rules, filter_ + shared.filter_rules)
        # A full sync renders while the tool writes: rendering is part of "write".
        self._report(
            "full",
            len(state.services),
            {"read": read - started, "write": written - read},
            f"{shared.chains} port chains",
        )

    def _restore_batched(
        self,
        ipt: Iptables,
        ctx: render.RenderContext,
        ports: Iterable[render.PortRules],
        shared: render.SharedLines,
        existing_nat: Iterable[str],
    ) -> list[str]:
        """iptables-nft: the static chains, then the port chains in batches (see the
        module docstring); returns the stale nat chains, for the last input to delete."""
        stale = set(existing_nat) - set(render.static_nat_chains(ctx))

        def collected() -> Iterator[render.PortRules]:
            for rules in ports:
                shared.add(rules)
                stale.difference_update(rules.nat_chains)
                yield rules

        self._restore(ipt, render.render_static(ctx))
        for batch in _batches(collected(), NFT_BATCH_CHAINS):
            self._restore(ipt, render.render_port_chains(batch))
        return sorted(stale)

    def _sync_partial(
        self, ipt: Iptables, ctx: render.RenderContext, state: ProxyState, hint: SyncHint
    ) -> None:
        """Write the ports named in the hint; what they were comes from `hint.previous`.

        Since the last sync succeeded, the kernel holds exactly what rendering the
        previous states gives: their chains, their top-level rules. Nothing is kept
        between syncs to know it. (Were the hint wrong, a `-D` of a rule that is not
        there fails the restore, and the full sync that follows repairs everything.)
        """
        started = self._clock()
        changes: list[tuple[ServicePortName, ServicePortState | None, ServicePortState | None]]
        changes = [
            (name, hint.previous.get(name), state.services.get(name))
            for name in sorted(hint.changed)  # sorted: the same input for the same change
        ]
        endpoints = self._endpoints
        for _, old_state, new_state in changes:
            endpoints += len(new_state.all_endpoints) if new_state else 0
            endpoints -= len(old_state.all_endpoints) if old_state else 0
        comments = self._comments(endpoints)

        rewrite: list[render.PortRules] = []
        delete: list[str] = []
        old_top: list[render.TopLevel] = []
        new_top: list[render.TopLevel] = []
        nat_count, filter_count = self._counts
        for name, old_state, new_state in changes:
            old = new = None
            if old_state is not None:
                old = render.render_port(name, old_state, ctx, endpoint_comments=comments)
                old_top.append(old.top_level)
                nat, filter_ = old.rule_counts()
                nat_count, filter_count = nat_count - nat, filter_count - filter_
            if new_state is not None:
                new = render.render_port(name, new_state, ctx, endpoint_comments=comments)
                new_top.append(new.top_level)
                nat, filter_ = new.rule_counts()
                nat_count, filter_count = nat_count + nat, filter_count + filter_
                if old is None or old.nat_rules != new.nat_rules:
                    rewrite.append(new)
            if old is not None:
                keep = set(new.nat_chains) if new is not None else set()
                delete.extend(chain for chain in old.nat_chains if chain not in keep)
        top = render.top_level_change(old_top, new_top)
        rendered = self._clock()

        chains = sum(len(rules.nat_chains) for rules in rewrite)
        if self._batched() and chains > NFT_BATCH_CHAINS:
            inputs = [render.render_port_chains(b) for b in _batches(rewrite, NFT_BATCH_CHAINS)]
            inputs.append(render.render_partial(top=top, delete_nat=delete))
        else:
            inputs = [render.render_partial(top=top, write=rewrite, delete_nat=delete)]
        inputs = [text for text in inputs if text]
        for text in inputs:
            self._restore(ipt, text)
        self._endpoints = endpoints
        self._counts = (nat_count, filter_count)
        self._report(
            "partial",
            len(changes),
            {"render": rendered - started, "write": self._clock() - rendered},
            f"{len(inputs)} restore inputs, {sum(len(text) for text in inputs)} bytes",
        )

    def _report(self, kind: str, ports: int, phases: dict[str, float], detail: str) -> None:
        """Phase times (seconds) to the metrics sink and the debug log."""
        for phase, seconds in phases.items():
            self._config.metrics.observe_phase(phase, seconds)
        log.debug(
            "%s sync of %d ports: %s (%s)",
            kind,
            ports,
            ", ".join(f"{phase} {seconds * 1000:.1f} ms" for phase, seconds in phases.items()),
            detail,
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

    def _restore(
        self,
        ipt: Iptables,
        make_input: str | Callable[[], Iterable[str]],
        *,
        replay: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        """Run iptables-restore on a text, or on the chunks `make_input()` streams.

        When the tool refuses a line of a streamed input, the input is produced again
        (`replay`, else `make_input`: both must give the same text) to show that line
        and its neighbours, since a streamed input is not kept.
        """
        try:
            ipt.restore(make_input)
        except RestoreError as err:
            rebuilt = make_input if isinstance(make_input, str) else (replay or make_input)()
            text = "".join(rebuilt)
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
        self._in_sync = False
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


def _batches(ports: Iterable[render.PortRules], chains: int) -> Iterator[list[render.PortRules]]:
    """Consecutive groups of ports holding about `chains` chains each (a port is never split)."""
    batch: list[render.PortRules] = []
    size = 0
    for rules in ports:
        batch.append(rules)
        size += len(rules.nat_chains)
        if size >= chains:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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
