"""A stateful fake of `nft -f -` that rejects what the kernel would.

It understands the commands the nftables backend writes (`add/delete table`,
`add/flush/delete chain`, `add rule`, `add map/set`, `add/delete element`, `list tables`,
`list chains`, `list chain`) and keeps tables, chains, rules, sets and elements. Like the kernel it
applies a script all or nothing, and refuses:

- a reference to a table, chain, set or map that does not exist (in a rule's
  `jump`/`goto`/`@set`, or in a verdict element's `goto`);
- an element added twice with different data, or deleted when absent;
- a chain deleted while something jumps to it (its own rules go with it).

Errors are printed the way `nft` prints them, naming the script line
(``/dev/stdin:LINE:1-N: Error: ...``). `ruleset()` prints the state canonically (for
"byte-identical" assertions), and `trace()` follows a packet through our dispatch maps
to the endpoints it can land on.

Use it as the `CommandRunner` of `proxy.kernel.nft.NftProcess`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

from proxy.kernel.commands import CommandResult, Input, joined

ENOENT = "No such file or directory"
EEXIST = "File exists"
EBUSY = "Device or resource busy"

_REF = re.compile(r"\b(?:jump|goto)\s+([A-Za-z0-9_./-]+)")
_SET_REF = re.compile(r"@([A-Za-z0-9_./-]+)")
_DNAT = re.compile(r"numgen random mod (\d+) map @([A-Za-z0-9_-]+)")
_PICK = re.compile(r"numgen random mod (\d+) vmap @([A-Za-z0-9_-]+)")
_PLAIN_DNAT = re.compile(r"dnat to (\S+)$")
_AFFINITY = re.compile(r"(?:saddr|update) @affinity-")


class RefusedError(Exception):
    """One command the kernel would refuse."""


@dataclass
class FakeChain:
    declaration: str = ""
    rules: list[str] = field(default_factory=list)


@dataclass
class FakeSet:
    declaration: str
    is_map: bool
    elements: dict[str, str | None] = field(default_factory=dict)


@dataclass
class FakeTable:
    chains: dict[str, FakeChain] = field(default_factory=dict)
    sets: dict[str, FakeSet] = field(default_factory=dict)


@dataclass(frozen=True)
class Trace:
    """Where a packet to one destination goes: a verdict, or DNAT to these endpoints."""

    verdict: str
    """"dnat", "reject", "drop", or "none" (not a service)."""
    chain: str = ""
    endpoints: tuple[str, ...] = ()


def _split_elements(body: str) -> list[str]:
    return [part.strip() for part in body.split(",") if part.strip()]


class FakeNft:
    """The fake `nft` (see the module docstring). `scripts` records every script run."""

    def __init__(self) -> None:
        self.tables: dict[str, FakeTable] = {}
        self.scripts: list[str] = []
        self.fail_next: str | None = None
        """When set, the next script fails on its first line containing this text."""

    # -- CommandRunner -------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, stdin: Input | None = None) -> CommandResult:
        args = tuple(argv)
        if args[:1] != ("nft",) or args[-2:] != ("-f", "-"):
            return CommandResult(args, 127, "", f"fake nft: unsupported argv {args}")
        check = "-c" in args
        script = joined(stdin) or ""
        if not check:
            self.scripts.append(script)
        work = copy.deepcopy(self.tables)
        output: list[str] = []
        for number, raw in enumerate(script.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if self.fail_next is not None and self.fail_next in line:
                    self.fail_next = None
                    raise RefusedError(f"Could not process rule: {ENOENT}")
                self._command(work, line, output)
            except RefusedError as err:
                message = f"/dev/stdin:{number}:1-{len(raw)}: Error: {err}\n{raw}\n"
                return CommandResult(args, 1, "", message)
        if not check:
            self.tables = work
        return CommandResult(args, 0, "".join(output), "")

    # -- commands ------------------------------------------------------------------------

    def _command(self, tables: dict[str, FakeTable], line: str, output: list[str]) -> None:
        words = line.split()
        verb, what = words[0], words[1]
        if (verb, what) == ("list", "tables"):
            output.extend(f"table {name}\n" for name in tables)
            return
        if (verb, what) == ("list", "chains"):
            for name, listed in tables.items():
                output.append(f"table {name} {{\n")
                for chain, content in listed.chains.items():
                    output.append(f"\tchain {chain} {{\n")
                    if content.declaration:
                        output.append(f"\t\t{content.declaration.strip('{} ')}\n")
                    output.append("\t}\n")
                output.append("}\n")
            return
        family, name = words[2], words[3]
        key = f"{family} {name}"
        if what == "table":
            if verb == "add":
                tables.setdefault(key, FakeTable())
            elif verb == "delete":
                self._table(tables, key)
                del tables[key]
            else:
                raise RefusedError(f"fake nft: unsupported {line!r}")
            return
        table = self._table(tables, key)
        target = words[4]
        rest = line.split(None, 5)[5] if len(words) > 5 else ""
        if what == "chain":
            self._chain_command(table, verb, target, rest, output, key)
        elif what == "rule" and verb == "add":
            self._add_rule(table, target, rest)
        elif what in ("map", "set"):
            self._set_command(table, verb, what, target, rest)
        elif what == "element":
            self._element_command(table, verb, target, rest)
        else:
            raise RefusedError(f"fake nft: unsupported {line!r}")

    @staticmethod
    def _table(tables: dict[str, FakeTable], key: str) -> FakeTable:
        try:
            return tables[key]
        except KeyError:
            raise RefusedError(f"Could not process rule: {ENOENT} (table {key})") from None

    @staticmethod
    def _chain(table: FakeTable, name: str) -> FakeChain:
        try:
            return table.chains[name]
        except KeyError:
            raise RefusedError(f"Could not process rule: {ENOENT} (chain {name})") from None

    def _chain_command(
        self, table: FakeTable, verb: str, name: str, rest: str, output: list[str], key: str
    ) -> None:
        if verb == "add":
            table.chains.setdefault(name, FakeChain(declaration=rest))
        elif verb == "flush":
            self._chain(table, name).rules.clear()
        elif verb == "delete":
            self._chain(table, name)
            if self._references(table, name):
                raise RefusedError(f"Could not process rule: {EBUSY} (chain {name})")
            del table.chains[name]
        elif verb == "list":
            chain = self._chain(table, name)
            output.append(f"table {key} {{\n\tchain {name} {{\n")
            output.extend(f"\t\t{rule}\n" for rule in chain.rules)
            output.append("\t}\n}\n")
        else:
            raise RefusedError(f"fake nft: unsupported chain verb {verb}")

    @staticmethod
    def _references(table: FakeTable, chain: str) -> bool:
        for other in table.chains.values():
            if any(chain in _REF.findall(rule) for rule in other.rules):
                return True
        for fake_set in table.sets.values():
            for value in fake_set.elements.values():
                if value is not None and chain in _REF.findall(value):
                    return True
        return False

    def _add_rule(self, table: FakeTable, chain: str, rule: str) -> None:
        target = self._chain(table, chain)
        for ref in _REF.findall(rule):
            self._chain(table, ref)
        for ref in _SET_REF.findall(rule):
            if ref not in table.sets:
                raise RefusedError(f"Could not process rule: {ENOENT} (set {ref})")
        target.rules.append(rule)

    @staticmethod
    def _set_command(table: FakeTable, verb: str, what: str, name: str, rest: str) -> None:
        if verb == "add":
            existing = table.sets.get(name)
            if existing is None:
                table.sets[name] = FakeSet(declaration=rest, is_map=what == "map")
            elif existing.declaration != rest:
                raise RefusedError(f"Could not process rule: {EEXIST} ({what} {name})")
        elif verb == "flush":
            if name not in table.sets:
                raise RefusedError(f"Could not process rule: {ENOENT} ({what} {name})")
            table.sets[name].elements.clear()
        elif verb == "delete":
            if name not in table.sets:
                raise RefusedError(f"Could not process rule: {ENOENT} ({what} {name})")
            if any(
                name in _SET_REF.findall(rule)
                for chain in table.chains.values()
                for rule in chain.rules
            ):
                raise RefusedError(f"Could not process rule: {EBUSY} ({what} {name})")
            del table.sets[name]
        else:
            raise RefusedError(f"fake nft: unsupported {what} verb {verb}")

    def _element_command(self, table: FakeTable, verb: str, name: str, rest: str) -> None:
        fake_set = table.sets.get(name)
        if fake_set is None:
            raise RefusedError(f"Could not process rule: {ENOENT} (set {name})")
        body = rest.strip()
        if not (body.startswith("{") and body.endswith("}")):
            raise RefusedError(f"syntax error in elements of {name}")
        for item in _split_elements(body[1:-1]):
            key, sep, value = item.partition(" : ")
            key = key.strip()
            if verb == "add":
                data = value.strip() if sep else None
                if fake_set.is_map != (data is not None):
                    raise RefusedError(f"element {item!r} does not fit {name}")
                if data is not None:
                    for ref in _REF.findall(data):
                        self._chain(table, ref)
                if key in fake_set.elements and fake_set.elements[key] != data:
                    raise RefusedError(
                        f"Could not process rule: {EEXIST} (element {key} of {name})"
                    )
                fake_set.elements[key] = data
            elif verb == "delete":
                if key not in fake_set.elements:
                    raise RefusedError(
                        f"Could not process rule: {ENOENT} (element {key} of {name})"
                    )
                del fake_set.elements[key]
            else:
                raise RefusedError(f"fake nft: unsupported element verb {verb}")

    # -- inspection ----------------------------------------------------------------------

    def ruleset(self) -> str:
        """Every table, canonically (elements sorted), like a stable `nft list ruleset`."""
        out: list[str] = []
        for key in sorted(self.tables):
            table = self.tables[key]
            out.append(f"table {key}")
            for name in sorted(table.sets):
                fake_set = table.sets[name]
                out.append(f"  set {name} {fake_set.declaration}")
                for element, value in sorted(fake_set.elements.items()):
                    out.append(f"    {element}" if value is None else f"    {element} : {value}")
            for name in sorted(table.chains):
                chain = table.chains[name]
                out.append(f"  chain {name} {chain.declaration}".rstrip())
                out.extend(f"    {rule}" for rule in chain.rules)
        return "\n".join(out) + "\n"

    def elements(self, table: str, name: str) -> dict[str, str | None]:
        return dict(self.tables[table].sets[name].elements)

    def trace(
        self,
        table: str,
        daddr: str,
        proto: str,
        port: int,
        *,
        nodeport: bool = False,
        source: str = "outside",
        saddr: str | None = None,
    ) -> Trace:
        """Follow our maps for a new connection to daddr:port (a NodePort with `nodeport`).

        `source` is "outside" (a client beyond the node), "pod" (a pod on this node,
        source in the cluster CIDRs) or "node" (the node itself); `saddr`, when given,
        is checked against loadBalancerSourceRanges. As in the kernel, the node's own
        packets meet the filter checks before DNAT (output hook: filter -110, nat -100),
        the others after it (forward and input come after prerouting's DNAT).
        """
        tables = self.tables[table]
        if nodeport:
            dispatch, check, key, base = (
                "service-nodeports",
                "no-endpoint-nodeports",
                f"{proto} . {port}",
                str(port),
            )
        else:
            dispatch, check, key, base = (
                "service-ips",
                "no-endpoint-services",
                f"{daddr} . {proto} . {port}",
                f"{daddr} . {port}",
            )
        if saddr is not None and key in tables.sets["firewall-ips"].elements:
            allowed = [
                element.rsplit(" . ", 1)[1]
                for element in tables.sets["firewall-allow"].elements
                if element.rsplit(" . ", 1)[0] == key
            ]
            if not any(ip_address(saddr) in ip_network(cidr) for cidr in allowed):
                return Trace("drop")

        def filtered() -> Trace | None:
            verdict = tables.sets[check].elements.get(key)
            if verdict is None:
                return None
            return Trace("drop" if verdict == "drop" else "reject")

        if source == "node" and (early := filtered()) is not None:
            return early
        target = tables.sets[dispatch].elements.get(key)
        if target is not None:
            chain = target.split()[-1]
            found = self._walk(tables, chain, base, source, depth=0)
            if found is not None:
                return Trace("dnat", chain, found)
        return filtered() or Trace("none")

    def _walk(
        self, tables: FakeTable, chain: str, base: str, source: str, *, depth: int
    ) -> tuple[str, ...] | None:
        """The endpoints a chain DNATs a new connection to (no affinity recorded yet)."""
        assert depth < 8, f"chain loop at {chain}"
        for rule in tables.chains[chain].rules:
            if not _applies(rule, source) or _AFFINITY.search(rule):
                continue  # a client with affinity: none in a fresh trace
            match = _DNAT.search(rule)
            if match is not None:
                count, endpoint_map = int(match.group(1)), match.group(2)
                elements = tables.sets[endpoint_map].elements
                return tuple(
                    str(elements[f"{base} . {index}"]).replace(" . ", ":") for index in range(count)
                )
            pick = _PICK.search(rule)
            if pick is not None:
                picks = tables.sets[pick.group(2)].elements
                found: list[str] = []
                for index in range(int(pick.group(1))):
                    target = str(picks[str(index)]).split()[-1]
                    found.extend(self._walk(tables, target, base, source, depth=depth + 1) or ())
                return tuple(found)
            plain = _PLAIN_DNAT.search(rule)
            if plain is not None:
                return (plain.group(1),)
            if rule.startswith("goto "):
                return self._walk(tables, rule.split()[1], base, source, depth=depth + 1)
        return None


def _applies(rule: str, source: str) -> bool:
    """Does a dnat rule apply to traffic from `source` (see `FakeNft.trace`)?"""
    if rule.startswith("fib saddr type local"):
        return source == "node"
    if rule.startswith(("ip saddr", "ip6 saddr")):
        return source == "pod"
    return True
