"""`python -m benchmarks.report RESULTS.json [--out DIR]`: the Markdown and plots again.

Renders `results.md`, `convergence.png` and `changes.png` from a results document
(what `python -m benchmarks` does at the end of a run), e.g. after the report's format
changed, without measuring anything. Exit 1 when the document is not well formed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import markdown, plots
from benchmarks.results import validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, help="default: the results file's directory")
    args = parser.parse_args(argv)
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    doc = json.loads(args.results.read_text())
    (out / "results.md").write_text(markdown.render(doc))
    plots.render(doc, out)
    problems = validate(doc)
    for problem in problems:
        print(f"malformed result: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
