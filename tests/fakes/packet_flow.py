"""Trace a connection's first packet through the fake's tables, every branch at once.

`trace(tables, src=..., dst=..., proto=..., dport=...)` walks the path netfilter
takes for a NEW connection: nat PREROUTING (or OUTPUT for a packet the node sends),
then filter INPUT when the (possibly rewritten) destination is local, else FORWARD
(OUTPUT for a sent packet), then nat POSTROUTING. A `-m statistic --mode random`
rule forks the walk: both "taken" and "not taken" are followed, with their
probabilities, so the result lists every endpoint the cascade can land on and how
likely each is.

The result reads like the test it serves::

    flow = trace(fake.tables(), src="198.18.64.5", dst="198.19.0.10", proto="tcp", dport=80)
    assert flow.endpoints == {"198.18.64.7:8080", "198.18.64.8:8080"}
    assert not flow.masqueraded

Matches and targets the tracer does not understand raise `UnsupportedRuleError`
rather than being guessed, so a test can never pass by accident.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache

from tests.fakes.iptables_fake import Match, Rule, Table, split_destination

MAX_DEPTH = 32
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class UnsupportedRuleError(Exception):
    """The ruleset uses a match or target the tracer cannot evaluate."""


@dataclass(frozen=True, slots=True)
class Path:
    """One way the packet can go."""

    verdict: str
    """ACCEPT, DROP or REJECT."""
    destination: str
    """`ip:port` the packet is sent to (after DNAT, if any)."""
    dnat: bool
    masqueraded: bool
    probability: float
    chains: tuple[str, ...]
    """Every chain entered, `table/chain`, in order (for failure messages)."""


@dataclass(frozen=True, slots=True)
class Trace:
    """Every path of one packet."""

    paths: tuple[Path, ...]

    @property
    def verdicts(self) -> frozenset[str]:
        return frozenset(path.verdict for path in self.paths)

    @property
    def accepted(self) -> tuple[Path, ...]:
        return tuple(path for path in self.paths if path.verdict == "ACCEPT")

    @property
    def endpoints(self) -> frozenset[str]:
        """Where accepted, DNATed paths land."""
        return frozenset(path.destination for path in self.accepted if path.dnat)

    @property
    def rejected(self) -> bool:
        return self.verdicts == {"REJECT"}

    @property
    def dropped(self) -> bool:
        return self.verdicts == {"DROP"}

    @property
    def masqueraded(self) -> bool:
        """Whether accepted paths are masqueraded; raises when some are and some not."""
        flags = {path.masqueraded for path in self.accepted}
        if len(flags) != 1:
            raise ValueError(f"masquerading differs by path (or nothing accepted): {self}")
        return flags.pop()

    @property
    def masqueraded_endpoints(self) -> frozenset[str]:
        return frozenset(path.destination for path in self.accepted if path.masqueraded)

    def probabilities(self) -> dict[str, float]:
        """Chance of landing on each destination (accepted paths)."""
        chances: dict[str, float] = {}
        for path in self.accepted:
            chances[path.destination] = chances.get(path.destination, 0.0) + path.probability
        return chances

    def __str__(self) -> str:
        return "; ".join(
            f"{p.verdict} {p.destination} masq={p.masqueraded} p={p.probability:.3f} "
            f"via {' > '.join(p.chains)}"
            for p in self.paths
        )


@dataclass(frozen=True, slots=True)
class _Packet:
    src: str
    dst: str
    proto: str
    sport: int
    dport: int
    mark: int = 0
    dnat: bool = False
    masqueraded: bool = False
    probability: float = 1.0
    chains: tuple[str, ...] = ()


@lru_cache(maxsize=4096)
def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(value, strict=False)


def _in(address: str, network: str) -> bool:
    return ipaddress.ip_address(address) in _network(network)


class _Tracer:
    def __init__(self, tables: Mapping[str, Table], local: frozenset[str]) -> None:
        self._tables = tables
        self._local = local

    def is_local(self, address: str) -> bool:
        return address in self._local or ipaddress.ip_address(address) in _LOOPBACK

    # -- matches -------------------------------------------------------------------------

    def _matches(self, match: Match, packet: _Packet) -> bool:
        result = self._evaluate(match, packet)
        return result != match.negated

    def _evaluate(self, match: Match, packet: _Packet) -> bool:
        option, value = match.option, match.value or ""
        if option == "-s":
            return _in(packet.src, value)
        if option == "-d":
            return _in(packet.dst, value)
        if option == "-p":
            return value in ("all", packet.proto)
        if option in ("--dport", "--sport"):
            port = packet.dport if option == "--dport" else packet.sport
            low, _, high = value.partition(":")
            return int(low or 0) <= port <= int(high or low or 65535)
        if option in ("--dports", "--ports"):
            return str(packet.dport) in value.split(",")
        if option in ("--dst-type", "--src-type"):
            types = set(value.split(","))
            if types != {"LOCAL"}:
                raise UnsupportedRuleError(f"addrtype {value}")
            return self.is_local(packet.dst if option == "--dst-type" else packet.src)
        if option == "--mark":
            mark, _, mask = value.partition("/")
            return packet.mark & int(mask or "0xffffffff", 0) == int(mark, 0)
        if option in ("--ctstate", "--state"):
            # The tracer follows a connection's first packet: NEW, and DNAT once rewritten.
            states = value.split(",")
            return "NEW" in states or ("DNAT" in states and packet.dnat)
        if option in ("--comment", "--mode"):
            return True
        if option == "--rcheck":
            # A first packet from a client no endpoint has seen: no affinity entry yet.
            return False
        if option in ("--set", "--name", "--mask", "--rsource", "--seconds", "--reap"):
            return True
        raise UnsupportedRuleError(f"match {option} {value}")

    # -- chains ------------------------------------------------------------------------------

    def run_chain(
        self, table: Table, name: str, packet: _Packet, depth: int = 0
    ) -> Iterator[tuple[str, _Packet]]:
        """Yield (outcome, packet) per branch; outcome RETURN means "fell off the chain"."""
        if depth > MAX_DEPTH:
            raise UnsupportedRuleError(f"chains nest deeper than {MAX_DEPTH} at {name}")
        chain = table.chains[name]
        packet = replace(packet, chains=(*packet.chains, f"{table.name}/{name}"))
        yield from self._from_rule(table, chain.rules, 0, packet, depth)

    def _from_rule(
        self, table: Table, rules: list[Rule], start: int, packet: _Packet, depth: int
    ) -> Iterator[tuple[str, _Packet]]:
        for index in range(start, len(rules)):
            rule = rules[index]
            chance = 1.0
            matched = True
            for match in rule.matches:
                if match.option == "--probability":
                    chance = float(match.value or 0)
                elif not self._matches(match, packet):
                    matched = False
                    break
            if not matched or chance == 0.0:
                continue
            if chance < 1.0:
                # Fork: the rule is skipped with probability 1 - chance.
                skipped = replace(packet, probability=packet.probability * (1 - chance))
                taken = replace(packet, probability=packet.probability * chance)
                yield from self._apply(table, rules, index, rule, taken, depth)
                yield from self._from_rule(table, rules, index + 1, skipped, depth)
                return
            yield from self._apply(table, rules, index, rule, packet, depth)
            return
        yield "RETURN", packet

    def _apply(
        self,
        table: Table,
        rules: list[Rule],
        index: int,
        rule: Rule,
        packet: _Packet,
        depth: int,
    ) -> Iterator[tuple[str, _Packet]]:
        """Apply `rule`'s target, then continue in this chain where the target allows."""
        target = rule.target
        if target is None or target == "LOG":
            yield from self._from_rule(table, rules, index + 1, packet, depth)
        elif target in ("ACCEPT", "DROP", "REJECT", "RETURN"):
            yield target, packet
        elif target == "MARK":
            marked = replace(packet, mark=_apply_mark(packet.mark, rule))
            yield from self._from_rule(table, rules, index + 1, marked, depth)
        elif target == "DNAT":
            host, port = split_destination(rule.option("--to-destination") or "")
            yield (
                "ACCEPT",
                replace(packet, dst=host, dport=port or packet.dport, dnat=True),
            )
        elif target in ("MASQUERADE", "SNAT"):
            yield "ACCEPT", replace(packet, masqueraded=True)
        elif target in table.chains:
            for outcome, after in self.run_chain(table, target, packet, depth + 1):
                if outcome != "RETURN":
                    yield outcome, after
                elif rule.goto:
                    yield "RETURN", after
                else:
                    yield from self._from_rule(table, rules, index + 1, after, depth)
        else:
            raise UnsupportedRuleError(f"target {target}")

    def hook(self, table_name: str, chain: str, packet: _Packet) -> Iterator[tuple[str, _Packet]]:
        """A built-in chain: falling off it applies its policy."""
        table = self._tables.get(table_name)
        if table is None or chain not in table.chains:
            yield "ACCEPT", packet
            return
        policy = table.chains[chain].policy or "ACCEPT"
        for outcome, after in self.run_chain(table, chain, packet):
            yield (policy if outcome == "RETURN" else outcome), after


def _apply_mark(mark: int, rule: Rule) -> int:
    for option, value in rule.target_options:
        number, _, mask_text = (value or "0").partition("/")
        bits = int(number, 0)
        if option == "--or-mark":
            return mark | bits
        if option == "--xor-mark":
            return mark ^ bits
        if option == "--and-mark":
            return mark & bits
        if option == "--set-mark":
            mask = int(mask_text, 0) if mask_text else 0xFFFFFFFF
            return (mark & ~mask) | bits
        if option == "--set-xmark":
            mask = int(mask_text, 0) if mask_text else 0xFFFFFFFF
            return (mark & ~mask) ^ bits
    raise UnsupportedRuleError(f"MARK {rule.text}")


def trace(
    tables: Mapping[str, Table],
    *,
    src: str,
    dst: str,
    proto: str,
    dport: int,
    hook: str = "prerouting",
    local_addresses: Iterable[str] = (),
    sport: int = 40000,
) -> Trace:
    """All paths of a NEW connection's first packet; `hook` is "prerouting" or "output".

    "prerouting" is a packet arriving from a pod or from outside; "output" one the
    node itself sends. `local_addresses` are the node's addresses (addrtype LOCAL;
    127/8 always is).
    """
    if hook not in ("prerouting", "output"):
        raise ValueError(f"hook must be prerouting or output, not {hook!r}")
    tracer = _Tracer(tables, frozenset(local_addresses))
    start = _Packet(src=src, dst=dst, proto=proto.lower(), sport=sport, dport=dport)
    nat_chain = "PREROUTING" if hook == "prerouting" else "OUTPUT"
    paths: list[Path] = []
    for verdict, packet in tracer.hook("nat", nat_chain, start):
        if verdict != "ACCEPT":
            paths.append(_path(verdict, packet))
            continue
        if hook == "output":
            filter_chain = "OUTPUT"
        else:
            filter_chain = "INPUT" if tracer.is_local(packet.dst) else "FORWARD"
        for filtered, after_filter in tracer.hook("filter", filter_chain, packet):
            if filtered != "ACCEPT" or filter_chain == "INPUT":
                paths.append(_path(filtered, after_filter))
                continue
            for final, sent in tracer.hook("nat", "POSTROUTING", after_filter):
                paths.append(_path(final, sent))
    return Trace(tuple(paths))


def _path(verdict: str, packet: _Packet) -> Path:
    host = f"[{packet.dst}]" if ":" in packet.dst else packet.dst
    return Path(
        verdict=verdict,
        destination=f"{host}:{packet.dport}",
        dnat=packet.dnat,
        masqueraded=packet.masqueraded,
        probability=packet.probability,
        chains=packet.chains,
    )
