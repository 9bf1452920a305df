"""`python -m benchmarks.report RESULTS.json... [--out DIR]`: the Markdown and plots again.

Renders `results.md`, `convergence.png` and `changes.png` from a results document
(what `python -m benchmarks` does at the end of a run), e.g. after the report's format
changed, without measuring anything. Several documents (runs of different grid points
on the same machine) are merged into one report, and `results.json` of the merge is
written too: every point keeps the figures and ratios of the run that measured it, and
the header lists every command. Exit 1 when a document is not well formed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import markdown, plots
from benchmarks.results import validate


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One document out of several runs (the first one's machine and config)."""
    merged: dict[str, Any] = json.loads(json.dumps(docs[0]))
    merged["config"] = {"runs": [doc["config"] for doc in docs]}
    for doc in docs[1:]:
        merged["command"] += f"`; `{doc['command']}"
        merged["finished"] = max(merged["finished"], doc["finished"])
        merged["points"].extend(doc["points"])
        merged["skipped"] = sorted(set(merged["skipped"]) | set(doc["skipped"]))
        merged["notes"] = merged.get("notes", []) + doc.get("notes", [])
        for key in ("churn", "burst", "cluster", "kopf"):
            merged.setdefault(key, {})
            for name, value in doc.get(key, {}).items():
                merged[key][name] = value
        if doc.get("churn"):
            merged["churn_point"] = doc["churn_point"]
    merged["points"].sort(key=lambda p: (p["services"] * p["endpoints"], p["services"]))
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="default: the first results file's directory")
    args = parser.parse_args(argv)
    out = args.out or args.results[0].parent
    out.mkdir(parents=True, exist_ok=True)
    docs = [json.loads(path.read_text()) for path in args.results]
    doc = merge(docs)
    if len(docs) > 1:
        (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "results.md").write_text(markdown.render(doc))
    plots.render(doc, out)
    problems = validate(doc)
    for problem in problems:
        print(f"malformed result: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
