"""The Markdown report of a results document: tables and the targets, met or missed.

Pure: a `results.json` document in, text out. Every figure is read from the document;
a figure that was not measured shows as `-`, and a target whose point was not on the
grid says so rather than guessing. Seconds print with two decimals, latencies in ms.
"""

from __future__ import annotations

from typing import Any

TARGET_POINT = "10000x10"
TARGET_BACKEND = "iptables-legacy"


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _label(point: dict[str, Any]) -> str:
    return f"{point['services']}x{point['endpoints']}"


def convergence_table(doc: dict[str, Any]) -> list[str]:
    lines = [
        "| backend | services x endpoints | status | first convergence s | kernel floor s | ratio |"
        " upstream layout s | upstream / floor | one-commit floor ms | list+watch CPU s |"
        " RSS steady / peak MiB | tool peak MiB (ours / floor) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point in doc["points"]:
        summary = point["summary"]
        first = point["convergence"][0] if point["convergence"] else {}
        floor_s = summary["floor_s"]
        up = summary["upstream_floor_s"]
        up_ratio = up / floor_s if up and floor_s else None
        status = (
            point["status"]
            if point["status"] == "ok"
            else f"**{point['status']}**: {point['detail']}"
        )
        floor_peak = point["floor"][0]["tool_peak_mib"] if point["floor"] else None
        lines.append(
            f"| {point['backend']} | {_label(point)} | {status} | "
            f"{_s(summary['first_convergence_s'])} | {_s(floor_s)} | "
            f"{_s(summary['ratio_to_floor'])} | "
            f"{_s(up)} | {_s(up_ratio)} | {_ms(summary['touch_floor_s'])} | "
            f"{_s(first.get('cpu_list_watch'))} | "
            f"{_s(first.get('rss_steady_mib'), 0)} / {_s(first.get('rss_peak_mib'), 0)} | "
            f"{_s(first.get('tool_peak_mib'), 0)} / {_s(floor_peak, 0)} |"
        )
    return lines


KINDS = ("add endpoint", "remove endpoint", "unready endpoint", "add service")


def changes_table(doc: dict[str, Any]) -> list[str]:
    lines = [
        "| backend | services x endpoints | "
        + " | ".join(f"{kind} p50 / p99 ms" for kind in KINDS)
        + " | samples each | p50 / one-commit floor | syncs (partial / full)"
        + " | sync periods spanned |",
        "|---|---|" + "---|" * (len(KINDS) + 4),
    ]
    for point in doc["points"]:
        if not point["changes"]:
            continue
        figures = point["summary"]["changes"]
        cells = []
        for kind in KINDS:
            f = figures.get(kind)
            if not f:
                cells.append("-")
                continue
            lost = f" ({f['lost']} lost)" if f["lost"] else ""
            cells.append(f"{_ms(f['p50'])} / {_ms(f['p99'])}{lost}")
        count = min((figures[k]["count"] for k in figures), default=0)
        changes = point["changes"]
        # The endpoint changes only: adding a service waits a min sync period by design.
        p50s = [figures[k]["p50"] for k in KINDS[:3] if k in figures and figures[k]["p50"]]
        touch = point["summary"]["touch_floor_s"]
        ratio = sum(p50s) / len(p50s) / touch if p50s and touch else None
        busy = point.get("lock_busy", 0)
        note = f" (xtables lock held elsewhere {busy} times)" if busy else ""
        lines.append(
            f"| {point['backend']} | {_label(point)}{note} | "
            + " | ".join(cells)
            + f" | {count} | {_s(ratio, 1)} | "
            f"{changes['partial_syncs']} / {changes['full_syncs']} | "
            f"{changes['span_sync_periods']:.1f} |"
        )
    return lines


def programming_table(doc: dict[str, Any]) -> list[str]:
    lines = [
        "| backend | scenario | changes | lost | written/s | end to end p50 / p90 / p99 s |"
        " proxy's histogram p50 / p90 / p99 s (count) | all seen after s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("churn", "burst"):
        for backend, prog in doc[name].items():
            s = prog["summary"]
            h = prog["proxy_histogram"]
            lines.append(
                f"| {backend} | {name} | {prog['changes']} | {prog['lost']} | {prog['rate']:.1f} | "
                f"{_s(s['p50'])} / {_s(s['p90'])} / {_s(s['p99'])} | "
                f"{_s(h.get('p50'))} / {_s(h.get('p90'))} / {_s(h.get('p99'))} "
                f"({h.get('count') or 0:.0f}) | {_s(prog['wall_seconds'])} |"
            )
    return lines


def cluster_table(doc: dict[str, Any]) -> list[str]:
    lines = [
        "| backend | nodes | services x endpoints | status | (change, node) pairs | lost |"
        " end to end p50 / p90 / p99 s | proxies' histograms p50 / p90 / p99 s (count) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend, c in doc.get("cluster", {}).items():
        s = c["summary"]
        h = c.get("proxy_histogram", {})
        lines.append(
            f"| {backend} | {c['nodes']} | {c['services']}x{c['endpoints']} | {c['status']} "
            f"{c['detail']} | {c['changes']} | {c['lost']} | "
            f"{_s(s['p50'])} / {_s(s['p90'])} / {_s(s['p99'])} | "
            f"{_s(h.get('p50'))} / {_s(h.get('p90'))} / {_s(h.get('p99'))} "
            f"({h.get('count') or 0:.0f}) |"
        )
    return lines


def kopf_table(doc: dict[str, Any]) -> list[str]:
    """kopf's on.event ingest next to our list + watch, per point (CPU from process start)."""
    lines = [
        "| services x endpoints | objects each | kopf: all seen after s | kopf CPU s |"
        " kopf peak RSS MiB | ours: both lists in after s | ours CPU s | kopf CPU / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, kopf in doc.get("kopf", {}).items():
        ours = [
            p
            for p in doc["points"]
            if _label(p) == label and p["convergence"] and p["convergence"][0]["cpu_list_watch"]
        ]
        first = ours[0]["convergence"][0] if ours else {}
        listed = first.get("milestones", {}).get("slices listed") if first else None
        cpu = first.get("cpu_list_watch") if first else None
        if not kopf.get("ok"):
            lines.append(f"| {label} | - | failed: {kopf.get('detail', '')[:80]} | | | | | |")
            continue
        ratio = kopf["cpu_seconds"] / cpu if cpu else None
        lines.append(
            f"| {label} | {kopf['services']} | {_s(kopf['wall_seconds'])} | "
            f"{_s(kopf['cpu_seconds'])} | {_s(kopf['peak_rss_mib'], 0)} | {_s(listed)} | "
            f"{_s(cpu)} | {_s(ratio, 1)} |"
        )
    return lines


def _find(doc: dict[str, Any], backend: str, label: str) -> dict[str, Any] | None:
    for point in doc["points"]:
        if point["backend"] == backend and _label(point) == label and point["status"] == "ok":
            found: dict[str, Any] = point
            return found
    return None


def targets(doc: dict[str, Any]) -> list[str]:
    """The issue's targets at 10k x 10 on iptables-legacy: met, missed, or not measured."""
    point = _find(doc, TARGET_BACKEND, TARGET_POINT)
    half = _find(doc, TARGET_BACKEND, "5000x10")
    churn = doc["churn"].get(TARGET_BACKEND) if doc.get("churn_point") == TARGET_POINT else None
    rows: list[tuple[str, str, float | None, float]] = []
    if point is not None:
        first = point["convergence"][0]
        rows += [
            ("first convergence / kernel floor", "x", point["summary"]["ratio_to_floor"], 1.5),
            ("initial list + watch, CPU", "s", first["cpu_list_watch"], 2.0),
            ("RSS steady", "MiB", first["rss_steady_mib"], 150.0),
        ]
    if point is not None and half is not None:
        big, small = point["summary"]["first_convergence_s"], half["summary"]["first_convergence_s"]
        rows.append(("growth 5k -> 10k (x 10)", "x", big / small if big and small else None, 2.2))
    if churn is not None:
        rows.append(("network programming p99 under churn", "s", churn["summary"]["p99"], 1.0))
    lines = [
        f"Targets (issue 12), {TARGET_BACKEND} at {TARGET_POINT}:",
        "",
        "| target | measured | limit | |",
        "|---|---|---|---|",
    ]
    for name, unit, value, limit in rows:
        verdict = "-" if value is None else ("met" if value <= limit else "**missed**")
        lines.append(f"| {name} | {_s(value)} {unit} | <= {limit:g} {unit} | {verdict} |")
    if point is None:
        missing = f"not measured: {TARGET_POINT} on {TARGET_BACKEND} is not in this run"
        lines.append(f"| every target | {missing} | | |")
    elif churn is None:
        lines.append(
            f"| network programming p99 under churn | not measured at {TARGET_POINT} | <= 1 s | |"
        )
    return lines


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    parts = [
        "# Benchmark results",
        "",
        f"Command: `{doc['command']}`  ",
        f"Run: {doc['started']} to {doc['finished']}  ",
        f"Machine: {m['cpus']} vCPU {m['cpu_model']}, {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"{m['iptables']}, {m['nft']}, Python {m['python']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_at_start'])}",
        "",
    ]
    for c in doc["config"].get("runs", [doc["config"]]):
        if c:
            parts.append(
                f"- {c.get('samples')} one-change samples of each kind per point; first "
                f"convergence deadline {c.get('deadline')} s; the proxy's sync period "
                f"{c.get('sync_period')} s, min sync period {c.get('min_sync_period')} s; "
                f"{c.get('repeat')} convergence(s) per point (median); grid "
                f"{', '.join(c.get('points', []))}"
            )
    parts += [f"- {line}" for line in doc["skipped"] + doc.get("notes", [])]
    parts += ["", "## First convergence and floors", "", *convergence_table(doc)]
    parts += [
        "",
        "## One change at a time (API write -> the kernel forwards by it)",
        "",
        *changes_table(doc),
    ]
    if doc["churn"] or doc["burst"]:
        parts += [
            "",
            f"## Network programming under churn and after a burst ({doc['churn_point']})",
            "",
        ]
        parts += programming_table(doc)
    if doc.get("kopf"):
        parts += ["", "## kopf's on.event ingest next to our list + watch", "", *kopf_table(doc)]
    if doc.get("cluster"):
        parts += ["", "## Cluster-wide network programming", "", *cluster_table(doc)]
    parts += ["", "## Targets", "", *targets(doc), ""]
    return "\n".join(parts)
