"""Label and field selectors, parsed and matched the way the Kubernetes API does it.

Label selectors follow `k8s.io/apimachinery/pkg/labels` (`Parse`):

- requirements separated by commas, all of which must hold (AND);
- `key`, `!key` (exists / does not exist);
- `key=value`, `key==value`, `key!=value` (`!=` also matches objects without the key);
- `key in (a,b)`, `key notin (a)` (`notin` also matches objects without the key);
- `key>3`, `key<3` (integer comparison; the label must exist and be an integer).

Keys must be qualified names (`[prefix/]name`) and values label values; anything else
is a `SelectorError`, which the API server answers with 400 BadRequest, as the real
one does. kube-proxy's own selector,
`!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`, is two
"does not exist" requirements.

Field selectors follow `k8s.io/apimachinery/pkg/fields`: `field=value`,
`field==value`, `field!=value`, comma = AND, with backslash escapes (`\\,` `\\=`
`\\!` `\\\\`). Which fields exist is the resource's business: the caller gives the set
it supports, and an unknown field is a `SelectorError` ("field label not supported").

Everything here is a pure function of its arguments: no state, nothing blocks, safe
from any thread. A parsed selector is a frozen value and may be shared.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

__all__ = [
    "FieldRequirement",
    "FieldSelector",
    "LabelRequirement",
    "LabelSelector",
    "SelectorError",
    "parse_field_selector",
    "parse_label_selector",
    "validate_label_key",
    "validate_label_value",
]


class SelectorError(ValueError):
    """A selector that does not parse; the message reads like the real API's."""


# -- label keys and values (k8s.io/apimachinery/pkg/util/validation) -------------------

_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def validate_label_key(key: str) -> str | None:
    """Why `key` is not a qualified name (`[dns-subdomain/]name`), or None if it is."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"prefix part of {key!r} must be a lowercase RFC 1123 subdomain"
    if not name or len(name) > 63 or not _NAME_PART.match(name):
        return (
            f"name part of {key!r} must consist of alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character (at most 63 characters)"
        )
    return None


def validate_label_value(value: str) -> str | None:
    """Why `value` is not a valid label value, or None if it is."""
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return (
            f"a valid label must be an empty string or consist of alphanumeric characters, "
            f"'-', '_' or '.', and must start and end with an alphanumeric character "
            f"(at most 63 characters), got {value!r}"
        )
    return None


# -- label selectors -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """One requirement: `key <operator> values`."""

    key: str
    operator: str
    """One of `exists`, `!`, `=`, `!=`, `in`, `notin`, `gt`, `lt`."""
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        op = self.operator
        if op == "exists":
            return present
        if op == "!":
            return not present
        if op in ("=", "in"):
            return present and labels[self.key] in self.values
        if op in ("!=", "notin"):
            return not present or labels[self.key] not in self.values
        if not present:
            return False
        try:
            have, want = int(labels[self.key]), int(self.values[0])
        except ValueError:
            return False
        return have > want if op == "gt" else have < want


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """All requirements must hold; no requirement at all matches everything."""

    requirements: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(req.matches(labels) for req in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements

    @classmethod
    def from_map(cls, selector: Mapping[str, str]) -> LabelSelector:
        """A Service-style `spec.selector`: every key equal to its value."""
        return cls(tuple(LabelRequirement(k, "=", (v,)) for k, v in sorted(selector.items())))


# The lexer of k8s.io/apimachinery/pkg/labels: these characters end an identifier.
_SPECIAL = frozenset("!=,()<> \t\n\r")
_TWO_CHAR_OPS = ("==", "!=")


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif text[i : i + 2] in _TWO_CHAR_OPS:
            tokens.append(text[i : i + 2])
            i += 2
        elif char in _SPECIAL:
            tokens.append(char)
            i += 1
        else:
            start = i
            while i < len(text) and text[i] not in _SPECIAL:
                i += 1
            tokens.append(text[start:i])
    return tokens


def _is_identifier(token: str | None) -> bool:
    return token is not None and token[0] not in _SPECIAL and token not in ("==", "!=")


class _LabelParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | None:
        token = self.peek()
        self.pos += 1
        return token

    def fail(self, why: str) -> SelectorError:
        return SelectorError(f"unable to parse requirement: {why} (selector {self.text!r})")

    def parse(self) -> LabelSelector:
        requirements: list[LabelRequirement] = []
        while self.peek() is not None:
            requirements.append(self.requirement())
            token = self.take()
            if token is None:
                break
            if token != ",":
                raise self.fail(f"found {token!r}, expected ','")
            if self.peek() is None:
                raise self.fail("found end of selector, expected a requirement after ','")
        return LabelSelector(tuple(requirements))

    def key(self) -> str:
        token = self.take()
        if not _is_identifier(token):
            raise self.fail(f"found {token!r}, expected a label key")
        assert token is not None
        if (why := validate_label_key(token)) is not None:
            raise self.fail(why)
        return token

    def value(self) -> str:
        token = self.peek()
        # An empty value ("a=" or "a=,b") is allowed, as in the real parser.
        if not _is_identifier(token):
            return ""
        self.pos += 1
        assert token is not None
        if (why := validate_label_value(token)) is not None:
            raise self.fail(why)
        return token

    def requirement(self) -> LabelRequirement:
        if self.peek() == "!":
            self.take()
            return LabelRequirement(self.key(), "!")
        key = self.key()
        op = self.peek()
        if op is None or op == ",":
            return LabelRequirement(key, "exists")
        self.take()
        if op in ("=", "=="):
            return LabelRequirement(key, "=", (self.value(),))
        if op == "!=":
            return LabelRequirement(key, "!=", (self.value(),))
        if op in ("in", "notin"):
            return LabelRequirement(key, op, self.value_set(op))
        if op in (">", "<"):
            number = self.take()
            if number is None or not re.fullmatch(r"-?\d+", number):
                raise self.fail(f"for 'gt', 'lt' operators, the value must be an integer: {key}")
            return LabelRequirement(key, "gt" if op == ">" else "lt", (number,))
        raise self.fail(f"found {op!r}, expected one of '=', '==', '!=', 'in', 'notin'")

    def value_set(self, op: str) -> tuple[str, ...]:
        if self.take() != "(":
            raise self.fail(f"expected '(' after {op!r}")
        values: list[str] = []
        while True:
            values.append(self.value())
            token = self.take()
            if token == ")":
                break
            if token != ",":
                raise self.fail(f"found {token!r}, expected ',' or ')' in a value set")
        if values == [""]:
            raise self.fail("for 'in', 'notin' operators, values set can't be empty")
        return tuple(values)


def parse_label_selector(text: str) -> LabelSelector:
    """Parse a `labelSelector` query value; raises `SelectorError`."""
    return _LabelParser(text).parse()


# -- field selectors -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    field: str
    equal: bool
    """True for `=`/`==`, False for `!=`."""
    value: str

    def matches(self, fields: Mapping[str, str]) -> bool:
        return (fields.get(self.field, "") == self.value) == self.equal


@dataclass(frozen=True, slots=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all(req.matches(fields) for req in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements

    def exact(self, field: str) -> str | None:
        """The value `field` must equal, when the selector pins it (a cheap index hit)."""
        for req in self.requirements:
            if req.field == field and req.equal:
                return req.value
        return None


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if text[i] == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\":
            if i + 1 >= len(text) or text[i + 1] not in "\\,=!":
                raise SelectorError(f"invalid escape sequence in field selector value {text!r}")
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _find_operator(term: str) -> tuple[int, str] | None:
    i = 0
    while i < len(term):
        if term[i] == "\\":
            i += 2
            continue
        for op in ("!=", "==", "="):
            if term.startswith(op, i):
                return i, op
        i += 1
    return None


def parse_field_selector(text: str, supported: Collection[str]) -> FieldSelector:
    """Parse a `fieldSelector` query value against the fields a resource supports."""
    requirements: list[FieldRequirement] = []
    for term in _split_unescaped(text, ","):
        if not term.strip():
            if text.strip():
                raise SelectorError(f"invalid selector: {text!r}; empty term")
            continue
        found = _find_operator(term)
        if found is None:
            raise SelectorError(f"invalid selector: {text!r}; can't understand {term!r}")
        index, op = found
        field = term[:index].strip()
        value = _unescape(term[index + len(op) :])
        if field not in supported:
            raise SelectorError(f'field label not supported: "{field}"')
        requirements.append(FieldRequirement(field, op != "!=", value))
    return FieldSelector(tuple(requirements))
