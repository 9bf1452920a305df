"""A stateful fake of the iptables tools: a `CommandRunner` that keeps real tables.

It parses what it is given the way iptables 1.8.9 does and refuses what the kernel
refuses, so a backend bug shows up as the same error a node would print:

- `*-restore [--noflush] [-w N]`: `*table`, `:CHAIN POLICY [p:b]`, `-A/-I/-D/-X/-F/-N/-P`,
  `COMMIT`. Each table section commits on its own at its COMMIT (measured: both
  iptables-nft-restore and iptables-legacy-restore keep an earlier committed table
  when a later section fails); a failing section leaves its table untouched. RefusedError:
  unknown tables, a missing COMMIT, rules in chains that do not exist, jumps to
  chains that do not exist, `-N` of an existing chain, `-X` of a chain that is
  referenced or not empty, unknown matches/options/targets, a `-m tcp` rule whose
  `-p` is not tcp, targets outside their table (DNAT outside nat, REJECT outside
  filter) or reachable from the wrong hook (MASQUERADE from PREROUTING), and loops.
- `*-save [-t table]`: iptables-save's format, user chains sorted, rules as given.
- `iptables [-w N] -t T -C/-I/-A/-D/-S/-N/-X/-F/-P`.

Tool names pick the state: `iptables-nft*` and `iptables-legacy*` (and `ip6tables-*`)
keep separate tables, so variant detection can be tested; plain `iptables` means
`default_variant`. Errors print in each variant's format and exit with its status.

Test hooks: `seed()` foreign rules, `hold_lock()` to simulate another process owning
the xtables lock, `refuse()` to make the "kernel" reject rules containing a string
(as a missing xt module would), `restore_inputs`/`calls` to assert on what was run,
and `tables()` for `tests.fakes.packet_flow`.

Single-threaded, like the backend that drives it.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from proxy.kernel.commands import CommandResult, Input, joined

VERSION = "v1.8.9"

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

# Options each match module accepts, with how many arguments they take.
MODULE_OPTIONS: dict[str, dict[str, int]] = {
    "tcp": {"--dport": 1, "--sport": 1, "--destination-port": 1, "--source-port": 1, "--syn": 0},
    "udp": {"--dport": 1, "--sport": 1, "--destination-port": 1, "--source-port": 1},
    "sctp": {"--dport": 1, "--sport": 1, "--destination-port": 1, "--source-port": 1},
    "comment": {"--comment": 1},
    "addrtype": {"--dst-type": 1, "--src-type": 1, "--limit-iface-in": 0, "--limit-iface-out": 0},
    "mark": {"--mark": 1},
    "conntrack": {"--ctstate": 1, "--ctstatus": 1},
    "state": {"--state": 1},
    "statistic": {"--mode": 1, "--probability": 1, "--every": 1, "--packet": 1},
    "multiport": {"--dports": 1, "--sports": 1, "--ports": 1},
    "recent": {
        "--name": 1,
        "--set": 0,
        "--rcheck": 0,
        "--update": 0,
        "--remove": 0,
        "--seconds": 1,
        "--reap": 0,
        "--rsource": 0,
        "--rdest": 0,
        "--mask": 1,
        "--hitcount": 1,
    },
}
_OPTION_ALIASES = {"--destination-port": "--dport", "--source-port": "--sport"}

TARGET_OPTIONS: dict[str, dict[str, int]] = {
    "ACCEPT": {},
    "DROP": {},
    "RETURN": {},
    "REJECT": {"--reject-with": 1},
    "DNAT": {"--to-destination": 1, "--random": 0, "--persistent": 0},
    "SNAT": {"--to-source": 1, "--random": 0, "--random-fully": 0, "--persistent": 0},
    "MASQUERADE": {"--to-ports": 1, "--random": 0, "--random-fully": 0},
    "REDIRECT": {"--to-ports": 1, "--random": 0},
    "MARK": {"--set-mark": 1, "--set-xmark": 1, "--or-mark": 1, "--xor-mark": 1, "--and-mark": 1},
    "LOG": {"--log-prefix": 1, "--log-level": 1},
}
TARGET_TABLES: dict[str, frozenset[str]] = {
    "DNAT": frozenset({"nat"}),
    "SNAT": frozenset({"nat"}),
    "MASQUERADE": frozenset({"nat"}),
    "REDIRECT": frozenset({"nat"}),
    "REJECT": frozenset({"filter"}),
}
TARGET_HOOKS: dict[str, frozenset[str]] = {
    "DNAT": frozenset({"PREROUTING", "OUTPUT"}),
    "REDIRECT": frozenset({"PREROUTING", "OUTPUT"}),
    "SNAT": frozenset({"POSTROUTING", "INPUT"}),
    "MASQUERADE": frozenset({"POSTROUTING"}),
    "REJECT": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
}
_ADDRTYPES = frozenset(
    {
        "UNSPEC",
        "UNICAST",
        "LOCAL",
        "BROADCAST",
        "ANYCAST",
        "MULTICAST",
        "BLACKHOLE",
        "UNREACHABLE",
        "PROHIBIT",
    }
)
_CTSTATES = frozenset(["INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED", "SNAT", "DNAT"])
_GENERIC = {
    "-s": "-s",
    "--source": "-s",
    "-d": "-d",
    "--destination": "-d",
    "-p": "-p",
    "--protocol": "-p",
    "-i": "-i",
    "--in-interface": "-i",
    "-o": "-o",
    "--out-interface": "-o",
}
_PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp"})
_TOOL = re.compile(
    r"^(?P<family>ip6?tables)(?:-(?P<variant>nft|legacy))?(?P<kind>-restore|-save)?$"
)
_LOCK_MESSAGE = "Another app is currently holding the xtables lock. Stopped waiting after {}s.\n"


class RefusedError(Exception):
    """What the tool or the kernel would refuse, with its message."""

    def __init__(self, message: str, *, kernel: bool = False) -> None:
        super().__init__(message)
        self.kernel = kernel
        """True for errors the kernel reports (exit 1/4) rather than the parser (exit 2)."""


@dataclass(frozen=True, slots=True)
class Match:
    """One match of a rule: `-d 198.18.0.1/32`, `--dport 80` (module tcp), `! --mark ...`."""

    option: str
    value: str | None
    negated: bool
    module: str | None


@dataclass(frozen=True, slots=True)
class Rule:
    """A parsed rule; `text` is its spec as saved (after `-A CHAIN `)."""

    text: str
    matches: tuple[Match, ...]
    target: str | None
    target_options: tuple[tuple[str, str | None], ...]
    goto: bool
    key: tuple[str, ...]
    """Normalised tokens, compared by `-C` and `-D`."""

    def option(self, name: str) -> str | None:
        """The value of a target option, e.g. `--to-destination`."""
        for option, value in self.target_options:
            if option == name:
                return value
        return None

    @property
    def comment(self) -> str | None:
        for match in self.matches:
            if match.option == "--comment":
                return match.value
        return None


@dataclass(slots=True)
class Chain:
    name: str
    policy: str | None
    """ACCEPT/DROP for built-in chains, None for user chains."""
    rules: list[Rule] = field(default_factory=list)

    @property
    def builtin(self) -> bool:
        return self.policy is not None


@dataclass(slots=True)
class Table:
    name: str
    chains: dict[str, Chain]

    @classmethod
    def empty(cls, name: str) -> Table:
        return cls(name, {chain: Chain(chain, "ACCEPT") for chain in BUILTIN_CHAINS[name]})

    def copy(self) -> Table:
        return Table(
            self.name,
            {name: Chain(name, c.policy, list(c.rules)) for name, c in self.chains.items()},
        )

    def references(self, target: str) -> Iterator[tuple[str, Rule]]:
        for chain in self.chains.values():
            for rule in chain.rules:
                if rule.target == target:
                    yield chain.name, rule


def split_rule(line: str) -> list[str]:
    """Split a rule line into tokens (shell-like quoting, fast when there is none)."""
    if '"' not in line and "'" not in line:
        return line.split()
    return shlex.split(line)


def _quote(token: str) -> str:
    return f'"{token}"' if (" " in token or not token) else token


def _network(value: str, family: int) -> str:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise RefusedError(f"host/network `{value}' not found") from None
    if network.version != family:
        raise RefusedError(f"host/network `{value}' not found")
    return str(network)


def split_destination(destination: str) -> tuple[str, int | None]:
    """`198.18.0.1:80`, `[fd00::1]:80` or a bare address -> (address, port or None)."""
    if destination.startswith("["):
        host, _, port = destination[1:].partition("]:")
        return host.rstrip("]"), int(port) if port else None
    if destination.count(":") == 1:
        host, _, port = destination.partition(":")
        return host, int(port)
    return destination, None


def _check_port(value: str) -> None:
    parts = value.split(":")
    if len(parts) > 2 or not all(p.isdigit() and int(p) <= 65535 for p in parts if p):
        raise RefusedError(f"invalid port/service `{value}' specified")


def _check_mark(value: str) -> None:
    for part in value.split("/"):
        try:
            int(part, 0)
        except ValueError:
            raise RefusedError(f'Bad MARK value "{value}"') from None


def parse_rule(
    tokens: Sequence[str], *, table: str, family: int, chains: Mapping[str, Chain]
) -> Rule:
    """Parse and check one rule spec as iptables and the kernel would."""
    matches: list[Match] = []
    modules: list[str] = []
    target: str | None = None
    goto = False
    target_options: list[tuple[str, str | None]] = []
    key: list[str] = []
    negate = False
    index = 0

    def argument(count: int) -> str | None:
        if count == 0:
            return None
        if index + 1 >= len(tokens):
            raise RefusedError(f'option "{tokens[index]}" requires an argument')
        return tokens[index + 1]

    while index < len(tokens):
        token = tokens[index]
        if token == "!":
            if negate or target is not None:
                raise RefusedError("multiple ! flags not allowed")
            negate = True
            key.append(token)
            index += 1
            continue
        if target is not None:
            allowed = TARGET_OPTIONS.get(target, {})
            if token not in allowed:
                raise RefusedError(f'unknown option "{token}"')
            value = argument(allowed[token])
            target_options.append((token, value))
            key.extend([token] if value is None else [token, value])
            index += 1 + allowed[token]
            continue
        if token in ("-j", "--jump", "-g", "--goto", "-m", "--match"):
            name = argument(1)
            assert name is not None
            if negate:
                raise RefusedError(f'cannot have ! before "{token}"')
            if token in ("-m", "--match"):
                if name not in MODULE_OPTIONS:
                    raise RefusedError(f"Couldn't load match `{name}':No such file or directory")
                modules.append(name)
                key.extend(["-m", name])
            else:
                target, goto = name, token in ("-g", "--goto")
                key.extend(["-g" if goto else "-j", name])
            index += 2
            continue
        if token in _GENERIC:
            option = _GENERIC[token]
            value = argument(1)
            assert value is not None
            if option in ("-s", "-d"):
                if "," in value and negate:
                    raise RefusedError("! not allowed with multiple addresses")
                value = _network(value, family)
            elif option == "-p":
                value = value.lower()
                if value in _PORT_PROTOCOLS:
                    modules.append(value)
            matches.append(Match(option, value, negate, None))
            key.extend([option, value])
            negate = False
            index += 2
            continue
        for module in reversed(modules):
            count = MODULE_OPTIONS[module].get(token)
            if count is None:
                continue
            value = argument(count)
            option = _OPTION_ALIASES.get(token, token)
            matches.append(Match(option, value, negate, module))
            key.extend([option] if value is None else [option, value])
            negate = False
            index += 1 + count
            break
        else:
            raise RefusedError(f'unknown option "{token}"')
    if negate:
        raise RefusedError("! at the end of a rule")

    _check_matches(matches, modules)
    if target is not None:
        _check_target(
            target, dict(target_options), matches, table=table, family=family, chains=chains
        )
    text = " ".join(_quote(token) for token in tokens)
    return Rule(text, tuple(matches), target, tuple(target_options), goto, tuple(key))


def _check_matches(matches: Sequence[Match], modules: Sequence[str]) -> None:
    protocol = next((m for m in matches if m.option == "-p"), None)
    for module in modules:
        if module in _PORT_PROTOCOLS and (
            protocol is None or protocol.negated or protocol.value != module
        ):
            raise RefusedError(f"match `{module}' needs -p {module}", kernel=True)
    for match in matches:
        value = match.value or ""
        if match.option in ("--dport", "--sport"):
            _check_port(value)
        elif match.option in ("--dports", "--sports", "--ports"):
            for part in value.split(","):
                _check_port(part)
        elif match.option in ("--dst-type", "--src-type"):
            if not set(value.split(",")) <= _ADDRTYPES:
                raise RefusedError(f"addrtype: bad type `{value}'")
        elif match.option in ("--ctstate", "--state"):
            if not set(value.split(",")) <= _CTSTATES:
                raise RefusedError(f'Bad ctstate "{value}"')
        elif match.option == "--mark":
            _check_mark(value)
        elif match.option == "--probability":
            try:
                chance = float(value)
            except ValueError:
                raise RefusedError(f'Bad probability "{value}"') from None
            if not 0.0 <= chance <= 1.0:
                raise RefusedError(f'Bad probability "{value}"')
        elif match.option == "--mode" and value not in ("random", "nth"):
            raise RefusedError(f'Bad mode "{value}"')
    modes = [m.value for m in matches if m.option == "--mode"]
    if "random" in modes and not any(m.option == "--probability" for m in matches):
        raise RefusedError("statistic: --mode random needs --probability")


def _check_target(
    target: str,
    options: Mapping[str, str | None],
    matches: Sequence[Match],
    *,
    table: str,
    family: int,
    chains: Mapping[str, Chain],
) -> None:
    if target not in TARGET_OPTIONS:
        chain = chains.get(target)
        if chain is None or chain.builtin:
            raise RefusedError(f"Couldn't load target `{target}':No such file or directory")
        return
    tables = TARGET_TABLES.get(target)
    if tables is not None and table not in tables:
        valid = "/".join(sorted(tables))
        raise RefusedError(f"target {target} is only valid in the {valid} table", kernel=True)
    if target == "DNAT":
        destination = options.get("--to-destination")
        if destination is None:
            raise RefusedError("DNAT: option --to-destination is required")
        host, port = split_destination(destination)
        protocol = next((m.value for m in matches if m.option == "-p" and not m.negated), None)
        if port is not None and protocol not in _PORT_PROTOCOLS:
            raise RefusedError("Need TCP, UDP, SCTP or DCCP with port specification")
        _network(host, family)
    if target == "MARK":
        operations = [name for name in options if name != "--random"]
        if len(operations) != 1:
            raise RefusedError("MARK: exactly one of --set-xmark/--or-mark/--xor-mark/... required")
        value = options[operations[0]]
        _check_mark(value or "")


@dataclass(frozen=True, slots=True)
class _Tool:
    stem: str
    """Which state: e.g. "iptables-nft"."""
    family: int
    kind: str
    """"" for iptables itself, "-restore" or "-save"."""
    variant: str
    name: str


class IptablesFake:
    """A `CommandRunner` implementing the iptables tools over in-memory tables."""

    def __init__(
        self,
        *,
        installed: Sequence[str] = ("nft", "legacy"),
        default_variant: str = "nft",
    ) -> None:
        self.installed = frozenset(installed)
        self.default_variant = default_variant
        self._state: dict[str, dict[str, Table]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.restore_inputs: list[str] = []
        """stdin of every restore call, accepted or not."""
        self._lock_busy = 0
        self._refused: list[str] = []

    # -- test hooks ------------------------------------------------------------------------

    def seed(self, text: str, *, variant: str = "nft", family: int = 4) -> None:
        """Load foreign rules (restore format, --noflush); they must be valid."""
        result = self.run([f"{_family_name(family)}-{variant}-restore", "--noflush"], stdin=text)
        if not result.ok:
            raise AssertionError(f"seed refused: {result.stderr}")

    def hold_lock(self, calls: int) -> None:
        """The next `calls` invocations find the xtables lock held and time out."""
        self._lock_busy = calls

    def refuse(self, fragment: str) -> None:
        """From now on the kernel refuses any rule whose text contains `fragment`."""
        self._refused.append(fragment)

    def tables(self, variant: str = "nft", family: int = 4) -> Mapping[str, Table]:
        """The committed tables of one variant (read them, do not change them)."""
        return self._state.get(f"{_family_name(family)}-{variant}", {})

    def chains(self, table: str, *, variant: str = "nft", family: int = 4) -> list[str]:
        found = self.tables(variant, family).get(table)
        return list(found.chains) if found else []

    def rules(self, table: str, chain: str, *, variant: str = "nft", family: int = 4) -> list[str]:
        """`-A CHAIN spec` lines of one chain, as iptables-save prints them."""
        found = self.tables(variant, family).get(table)
        if found is None or chain not in found.chains:
            return []
        return [f"-A {chain} {rule.text}" for rule in found.chains[chain].rules]

    def save_text(self, *, variant: str = "nft", family: int = 4, table: str | None = None) -> str:
        return _format_save(self.tables(variant, family), table)

    # -- CommandRunner ---------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, stdin: Input | None = None) -> CommandResult:
        stdin = joined(stdin)
        args = tuple(argv)
        self.calls.append(args)
        tool = self._tool(args[0]) if args else None
        if tool is None or tool.variant not in self.installed:
            return CommandResult(args, 127, "", f"{args[0] if args else ''}: not found")
        if tool.kind == "-save":
            return self._save(args, tool)
        if self._lock_busy > 0:
            self._lock_busy -= 1
            return CommandResult(args, 4, "", _LOCK_MESSAGE.format(_wait_seconds(args)))
        if tool.kind == "-restore":
            if stdin is not None:
                self.restore_inputs.append(stdin)
            return self._restore(args, tool, stdin or "")
        return self._iptables(args, tool)

    def _tool(self, name: str) -> _Tool | None:
        match = _TOOL.match(name.rsplit("/", 1)[-1])
        if match is None:
            return None
        family = 6 if match["family"] == "ip6tables" else 4
        variant = match["variant"] or self.default_variant
        return _Tool(
            stem=f"{match['family']}-{variant}",
            family=family,
            kind=match["kind"] or "",
            variant=variant,
            name=name,
        )

    def _tables(self, tool: _Tool) -> dict[str, Table]:
        return self._state.setdefault(tool.stem, {})

    # -- save ------------------------------------------------------------------------------

    def _save(self, args: tuple[str, ...], tool: _Tool) -> CommandResult:
        table: str | None = None
        if "-t" in args:
            table = args[args.index("-t") + 1]
            if table not in BUILTIN_CHAINS:
                return CommandResult(args, 1, "", f"{tool.name}: table '{table}' does not exist\n")
        tables = dict(self._tables(tool))
        if table is not None and table not in tables:
            tables[table] = Table.empty(table)
        return CommandResult(args, 0, _format_save(tables, table, tool.name), "")

    # -- restore ---------------------------------------------------------------------------

    def _restore(self, args: tuple[str, ...], tool: _Tool, text: str) -> CommandResult:
        noflush = False
        index = 1
        while index < len(args):
            flag = args[index]
            if flag in ("-n", "--noflush"):
                noflush = True
            elif flag in ("-w", "--wait", "-W", "--wait-interval"):
                index += 1
            else:
                return CommandResult(args, 2, "", f"{tool.name}: unknown option {flag}\n")
            index += 1
        committed = self._tables(tool)
        lines = text.splitlines()
        working: Table | None = None
        added: dict[int, int] = {}  # id(rule) -> input line, for error reports
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith("*"):
                    if working is not None:
                        raise RefusedError("COMMIT expected before a new table")
                    name = line[1:].strip()
                    if name not in BUILTIN_CHAINS:
                        raise RefusedError(f"table name '{name}' invalid")
                    working = (
                        committed[name].copy()
                        if noflush and name in committed
                        else Table.empty(name)
                    )
                    added = {}
                elif working is None:
                    raise RefusedError("no table specified")
                elif line == "COMMIT":
                    problem = _commit_problem(working, added, number, tool.variant)
                    if problem is not None:
                        return self._failure(args, tool, problem[0], problem[1], kernel=True)
                    committed[working.name] = working
                    working = None
                elif line.startswith(":"):
                    _declare(working, line)
                else:
                    self._command(working, split_rule(line), tool, added, number)
            except RefusedError as refused:
                return self._failure(args, tool, number, str(refused), kernel=refused.kernel)
        if working is not None:
            return CommandResult(
                args, 1, "", f"{tool.name}: COMMIT expected at line {len(lines) + 1}\n"
            )
        return CommandResult(args, 0, "", "")

    def _failure(
        self, args: tuple[str, ...], tool: _Tool, line: int, message: str, *, kernel: bool
    ) -> CommandResult:
        if tool.variant == "legacy" and kernel:
            name = tool.name.replace("-legacy", "")
            return CommandResult(args, 1, "", f"{message}\n{name}: line {line} failed\n")
        if kernel:
            return CommandResult(
                args, 4, "", f"{tool.name} {VERSION} (nf_tables): \nline {line}: {message}\n"
            )
        return CommandResult(
            args,
            2,
            "",
            f"{tool.name} {VERSION} ({tool.variant}): {message}\nError occurred at line: {line}\n"
            f"Try `{tool.name} -h' or '{tool.name} --help' for more information.\n",
        )

    def _command(
        self,
        table: Table,
        tokens: list[str],
        tool: _Tool,
        added: dict[int, int],
        number: int,
    ) -> None:
        if len(tokens) < 2 and tokens[:1] not in (["-X"], ["-F"]):
            raise RefusedError(f"bad command {' '.join(tokens)!r}")
        op, rest = tokens[0], tokens[1:]
        if op in ("-A", "--append", "-I", "--insert"):
            chain = _existing(table, rest[0])
            spec = rest[1:]
            position = 1
            if op in ("-I", "--insert") and spec and spec[0].isdigit():
                position = int(spec[0])
                spec = spec[1:]
            rule = self._parse(spec, table, tool)
            added[id(rule)] = number
            if op in ("-A", "--append"):
                chain.rules.append(rule)
            else:
                if not 1 <= position <= len(chain.rules) + 1:
                    raise RefusedError("Index of insertion too big", kernel=True)
                chain.rules.insert(position - 1, rule)
        elif op in ("-D", "--delete"):
            _delete(table, rest, self._parse(rest[1:], table, tool) if rest[1:2] else None)
        elif op in ("-X", "--delete-chain"):
            names = rest or [c.name for c in table.chains.values() if not c.builtin]
            for name in names:
                _delete_chain(table, name, tool.variant)
        elif op in ("-F", "--flush"):
            for chain in [_existing(table, rest[0])] if rest else list(table.chains.values()):
                chain.rules.clear()
        elif op in ("-N", "--new-chain"):
            if rest[0] in table.chains:
                raise RefusedError("Chain already exists.", kernel=True)
            table.chains[rest[0]] = Chain(rest[0], None)
        elif op in ("-P", "--policy"):
            chain = _existing(table, rest[0])
            if not chain.builtin or rest[1:] not in (["ACCEPT"], ["DROP"]):
                raise RefusedError("Bad built-in chain name or policy", kernel=True)
            chain.policy = rest[1]
        else:
            raise RefusedError(f"unknown command {op!r}")

    def _parse(self, spec: Sequence[str], table: Table, tool: _Tool) -> Rule:
        rule = parse_rule(spec, table=table.name, family=tool.family, chains=table.chains)
        for fragment in self._refused:
            if fragment in rule.text:
                raise RefusedError(f"No chain/target/match by that name ({fragment})", kernel=True)
        return rule

    # -- iptables itself -------------------------------------------------------------------

    def _iptables(self, args: tuple[str, ...], tool: _Tool) -> CommandResult:
        table_name = "filter"
        index = 1
        while index < len(args) and args[index] in ("-w", "--wait", "-W", "-t", "--table"):
            if args[index] in ("-t", "--table"):
                table_name = args[index + 1]
                index += 2
            elif args[index] in ("-w", "--wait") and (
                index + 1 < len(args) and args[index + 1].isdigit()
            ):
                index += 2
            else:
                index += 2 if args[index] == "-W" else 1
        if table_name not in BUILTIN_CHAINS:
            return CommandResult(
                args, 3, "", f"iptables {VERSION}: can't initialize iptables table `{table_name}'\n"
            )
        command = list(args[index:])
        if not command:
            return CommandResult(args, 2, "", "iptables: no command specified\n")
        tables = self._tables(tool)
        table = tables[table_name].copy() if table_name in tables else Table.empty(table_name)
        op = command[0]
        try:
            if op in ("-C", "--check"):
                chain = _existing(table, command[1])
                rule = self._parse(command[2:], table, tool)
                if all(existing.key != rule.key for existing in chain.rules):
                    return _bad_rule(args)
                return CommandResult(args, 0, "", "")
            if op in ("-S", "--list-rules"):
                return CommandResult(args, 0, _list_rules(table, command[1:2]), "")
            self._command(table, command, tool, {}, 0)
            problem = _commit_problem(table, {}, 0, tool.variant)
            if problem is not None:
                raise RefusedError(problem[1], kernel=True)
        except RefusedError as refused:
            code = 1 if refused.kernel or "by that name" in str(refused) else 2
            return CommandResult(args, code, "", f"iptables: {refused}\n")
        tables[table_name] = table
        return CommandResult(args, 0, "", "")


def _family_name(family: int) -> str:
    return "ip6tables" if family == 6 else "iptables"


def _wait_seconds(args: Sequence[str]) -> str:
    if "-w" in args:
        position = args.index("-w") + 1
        if position < len(args) and args[position].isdigit():
            return args[position]
    return "0"


def _bad_rule(args: tuple[str, ...]) -> CommandResult:
    return CommandResult(
        args, 1, "", "iptables: Bad rule (does a matching rule exist in that chain?).\n"
    )


def _existing(table: Table, name: str) -> Chain:
    chain = table.chains.get(name)
    if chain is None:
        raise RefusedError("No chain/target/match by that name.", kernel=True)
    return chain


def _declare(table: Table, line: str) -> None:
    parts = line[1:].split()
    if len(parts) < 2:
        raise RefusedError(f"bad chain declaration {line!r}")
    name, policy = parts[0], parts[1]
    if len(name) > 28:
        raise RefusedError(f"chain name `{name}' too long (must be under 29 chars)")
    chain = table.chains.get(name)
    if chain is not None and chain.builtin:
        if policy not in ("ACCEPT", "DROP", "-"):
            raise RefusedError(f"bad policy {policy!r}")
        if policy != "-":
            chain.policy = policy
    elif policy != "-":
        raise RefusedError(f"user chain {name} cannot have a policy")
    elif chain is not None:
        chain.rules.clear()  # --noflush still flushes a declared user chain
    else:
        table.chains[name] = Chain(name, None)


def _delete(table: Table, rest: Sequence[str], rule: Rule | None) -> None:
    chain = _existing(table, rest[0])
    if rule is None:
        if len(rest) < 2 or not rest[1].isdigit() or not 1 <= int(rest[1]) <= len(chain.rules):
            raise RefusedError("Index of deletion too big", kernel=True)
        del chain.rules[int(rest[1]) - 1]
        return
    for position, existing in enumerate(chain.rules):
        if existing.key == rule.key:
            del chain.rules[position]
            return
    raise RefusedError("Bad rule (does a matching rule exist in that chain?).", kernel=True)


def _delete_chain(table: Table, name: str, variant: str) -> None:
    chain = _existing(table, name)
    if chain.builtin:
        raise RefusedError("Invalid argument", kernel=True)
    if any(True for _ in table.references(name)):
        busy = (
            "Too many links"
            if variant == "legacy"
            else "CHAIN_DEL failed (Device or resource busy)"
        )
        raise RefusedError(f"{busy}: chain {name}", kernel=True)
    if chain.rules:
        raise RefusedError(f"Directory not empty: chain {name}", kernel=True)
    del table.chains[name]


def _commit_problem(
    table: Table, added: Mapping[int, int], commit_line: int, variant: str
) -> tuple[int, str] | None:
    """Check every path from a built-in chain: hooks of hook-bound targets, no loops.

    Legacy reports such errors on the COMMIT line; nft on the rule that completed the
    offending path (the latest one added in this batch).
    """

    checked: set[tuple[str, str]] = set()  # (chain, hook) pairs already found fine

    def walk(
        chain: Chain, hook: str, path: tuple[Rule, ...], seen: tuple[str, ...], blame: list[Rule]
    ) -> str | None:
        if (chain.name, hook) in checked:
            return None
        for rule in chain.rules:
            if rule.target is None:
                continue
            hooks = TARGET_HOOKS.get(rule.target)
            if hooks is not None and hook not in hooks:
                blame.extend((*path, rule))
                return f"target {rule.target} is not valid from {table.name}/{hook}"
            child = table.chains.get(rule.target)
            if child is None or child.builtin:
                continue
            if child.name in seen:
                blame.extend((*path, rule))
                return f"Too many levels of symbolic links: loop through {child.name}"
            found = walk(child, hook, (*path, rule), (*seen, child.name), blame)
            if found is not None:
                return found
        checked.add((chain.name, hook))
        return None

    for builtin in (c for c in table.chains.values() if c.builtin):
        blame: list[Rule] = []
        problem = walk(builtin, builtin.name, (), (), blame)
        if problem is not None:
            lines = [added[id(rule)] for rule in blame if id(rule) in added]
            line = max(lines) if variant != "legacy" and lines else commit_line
            return line, problem
    return None


def _format_save(tables: Mapping[str, Table], only: str | None, tool: str = "iptables-save") -> str:
    out: list[str] = []
    for name in BUILTIN_CHAINS:
        table = tables.get(name)
        if table is None or (only is not None and name != only):
            continue
        out.append(f"# Generated by {tool} {VERSION}\n*{name}\n")
        builtins = [c for c in table.chains.values() if c.builtin]
        users = sorted((c for c in table.chains.values() if not c.builtin), key=lambda c: c.name)
        out.extend(f":{c.name} {c.policy} [0:0]\n" for c in builtins)
        out.extend(f":{c.name} - [0:0]\n" for c in users)
        for chain in (*builtins, *users):
            out.extend(f"-A {chain.name} {rule.text}\n" for rule in chain.rules)
        out.append("COMMIT\n# Completed\n")
    return "".join(out)


def _list_rules(table: Table, chain_names: Sequence[str]) -> str:
    chains = [_existing(table, name) for name in chain_names] or list(table.chains.values())
    out: list[str] = []
    for chain in chains:
        out.append(f"-P {chain.name} {chain.policy}\n" if chain.builtin else f"-N {chain.name}\n")
    for chain in chains:
        out.extend(f"-A {chain.name} {rule.text}\n" for rule in chain.rules)
    return "".join(out)
