"""Label and field selectors: the grammar and the matching rules of the real API."""

from __future__ import annotations

import pytest

from lab.selectors import (
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
    validate_label_key,
    validate_label_value,
)

KUBE_PROXY = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
FIELDS = ("metadata.name", "metadata.namespace")


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("", {"a": "b"}, True),
        ("a=b", {"a": "b"}, True),
        ("a=b", {"a": "c"}, False),
        ("a=b", {}, False),
        ("a==b", {"a": "b"}, True),
        ("a!=b", {"a": "b"}, False),
        ("a!=b", {"a": "c"}, True),
        ("a!=b", {}, True),  # != also matches objects without the key
        ("a in (x,y)", {"a": "y"}, True),
        ("a in (x, y)", {"a": "z"}, False),
        ("a in (x,y)", {}, False),
        ("a notin (x)", {"a": "x"}, False),
        ("a notin (x)", {"a": "y"}, True),
        ("a notin (x)", {}, True),  # notin also matches objects without the key
        ("a", {"a": ""}, True),
        ("a", {"b": "1"}, False),
        ("!a", {"b": "1"}, True),
        ("!a", {"a": "1"}, False),
        ("a=b,c", {"a": "b", "c": "1"}, True),  # comma is AND
        ("a=b,c", {"a": "b"}, False),
        ("a=b, !c ,d in (1,2)", {"a": "b", "d": "2"}, True),
        ("a=", {"a": ""}, True),
        ("a>3", {"a": "4"}, True),
        ("a>3", {"a": "3"}, False),
        ("a<3", {"a": "x"}, False),
        ("a<3", {}, False),
        ("example.com/tier=web", {"example.com/tier": "web"}, True),
        (KUBE_PROXY, {"app": "web"}, True),
        (KUBE_PROXY, {"service.kubernetes.io/headless": ""}, False),
        (KUBE_PROXY, {"service.kubernetes.io/service-proxy-name": "other"}, False),
    ],
)
def test_label_selector_matching(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_label_selector(selector).matches(labels) is expected


@pytest.mark.parametrize(
    "selector",
    [
        "a in ()",
        "a in (x",
        "a in x",
        "a=b,",
        ",a",
        "a b",
        "a=b=c",
        "=b",
        "!",
        "a>x",
        "Bad_Prefix.com/a=b",
        "a=" + "v" * 64,
        "a=-bad",
    ],
)
def test_invalid_label_selectors_raise(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_label_selector(selector)


def test_a_service_selector_map_is_an_equality_selector() -> None:
    selector = LabelSelector.from_map({"app": "web", "tier": "front"})
    assert selector.matches({"app": "web", "tier": "front", "x": "y"})
    assert not selector.matches({"app": "web"})
    assert LabelSelector.from_map({}).empty


def test_label_keys_and_values_are_validated() -> None:
    assert validate_label_key("app") is None
    assert validate_label_key("kubernetes.io/service-name") is None
    assert validate_label_key("a/b/c") is not None
    assert validate_label_key("/x") is not None
    assert validate_label_key("x" * 64) is not None
    assert validate_label_value("") is None
    assert validate_label_value("v1.2_3-x") is None
    assert validate_label_value("has space") is not None


@pytest.mark.parametrize(
    ("selector", "fields", "expected"),
    [
        ("", {"metadata.name": "a"}, True),
        ("metadata.name=a", {"metadata.name": "a"}, True),
        ("metadata.name==a", {"metadata.name": "a"}, True),
        ("metadata.name=a", {"metadata.name": "b"}, False),
        ("metadata.name!=a", {"metadata.name": "b"}, True),
        ("metadata.name!=a", {"metadata.name": "a"}, False),
        (
            "metadata.name=a,metadata.namespace=ns",
            {"metadata.name": "a", "metadata.namespace": "other"},
            False,
        ),
        (
            "metadata.namespace!=kube-system,metadata.name=a",
            {"metadata.name": "a", "metadata.namespace": "default"},
            True,
        ),
        (r"metadata.name=a\,b", {"metadata.name": "a,b"}, True),
        (r"metadata.name=a\=b", {"metadata.name": "a=b"}, True),
    ],
)
def test_field_selector_matching(selector: str, fields: dict[str, str], expected: bool) -> None:
    assert parse_field_selector(selector, FIELDS).matches(fields) is expected


def test_field_selector_rejects_unknown_fields_and_garbage() -> None:
    with pytest.raises(SelectorError, match="field label not supported"):
        parse_field_selector("spec.nodeName=x", FIELDS)
    with pytest.raises(SelectorError):
        parse_field_selector("metadata.name", FIELDS)
    with pytest.raises(SelectorError):
        parse_field_selector(r"metadata.name=a\q", FIELDS)
    with pytest.raises(SelectorError):
        parse_field_selector("metadata.name=a,,metadata.namespace=b", FIELDS)


def test_field_selector_exposes_an_exact_name_for_index_lookups() -> None:
    assert parse_field_selector("metadata.name=node-1", FIELDS).exact("metadata.name") == "node-1"
    assert parse_field_selector("metadata.name!=node-1", FIELDS).exact("metadata.name") is None
    assert parse_field_selector("", FIELDS).empty
