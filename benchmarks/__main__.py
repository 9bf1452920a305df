"""`python -m benchmarks`: the benchmark harness (run as root).

    .venv/bin/python -m benchmarks [--quick] [--grid 100x1,1000x10] [--backends ...]
        [--samples 100] [--deadline 600] [--repeat 1] [--out benchmarks/results]

Runs the grid (`benchmarks.grid`) for every backend that exists here
(`benchmarks.backends`), with a live progress display, and writes to `--out`:
`results.json` (everything measured, `benchmarks.results`), `results.md` (the tables,
`benchmarks.markdown`) and `convergence.png`, `changes.png` (`benchmarks.plots`).
`--quick` is the CI smoke test: a tiny grid, every scenario once, in well under a
minute; it checks that the harness works and its output is well formed, times nothing.
Exit status: 0 when the output is well formed (a backend missing a deadline is a
result, not an error), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from benchmarks import grid, markdown, plots
from benchmarks.backends import BACKENDS, available
from benchmarks.results import validate
from benchmarks.run import main_run

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
"""Scratch output (git-ignored); the published run lives in benchmarks/latest/."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="the CI smoke test: tiny, untimed")
    parser.add_argument(
        "--grid", help="points SERVICESxENDPOINTS, comma separated (default: the issue's grid)"
    )
    parser.add_argument(
        "--backends",
        default=",".join(b.name for b in BACKENDS),
        help="comma separated; those absent from this proxy are skipped with a line",
    )
    parser.add_argument("--samples", type=int, default=100, help="one-change samples of each kind")
    parser.add_argument(
        "--deadline", type=float, default=600.0, help="seconds per first convergence"
    )
    parser.add_argument("--repeat", type=int, default=1, help="convergences per point (median)")
    parser.add_argument(
        "--sync-period", type=float, default=10.0, help="the proxy's sync period, s"
    )
    parser.add_argument("--churn-rate", type=float, default=20.0)
    parser.add_argument("--churn-seconds", type=float, default=60.0)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--churn-point", help="SERVICESxENDPOINTS (default: the largest point)")
    parser.add_argument("--no-upstream", action="store_true", help="skip upstream's layout floor")
    parser.add_argument(
        "--kopf",
        metavar="PYTHON",
        help="an interpreter with kopf installed: compare its on.event ingest at every point",
    )
    parser.add_argument("--nodes", type=int, default=0, help="nodes of the cluster-wide scenario")
    parser.add_argument("--nodes-point", default="1000x10", help="its services x endpoints")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> grid.Config:
    names = tuple(name.strip() for name in args.backends.split(",") if name.strip())
    if args.quick:
        return grid.quick(args.out, names, args.kopf)
    return grid.Config(
        points=grid.parse_points(args.grid) if args.grid else grid.FULL_GRID,
        backends=names,
        out=args.out,
        samples=args.samples,
        deadline=args.deadline,
        sync_period=args.sync_period,
        repeat=args.repeat,
        churn_rate=args.churn_rate,
        churn_seconds=args.churn_seconds,
        burst=args.burst,
        churn_point=grid.parse_points(args.churn_point)[0] if args.churn_point else None,
        upstream=not args.no_upstream,
        kopf=args.kopf,
        nodes=args.nodes,
        nodes_point=grid.parse_points(args.nodes_point)[0],
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if os.geteuid() != 0:
        print("python -m benchmarks: run as root (network namespaces, iptables)", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: every `finally` runs, so the proxies stop, their rules
    # go (--cleanup) and every namespace is deleted.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    config = config_from(args)
    unknown = [name for name in config.backends if name not in {b.name for b in BACKENDS}]
    if unknown:
        print(f"unknown backends {unknown}; known: {[b.name for b in BACKENDS]}", file=sys.stderr)
        return 2
    backends, skipped = available(config.backends)
    result = main_run(config, backends, skipped, argv)
    doc = json.loads((config.out / "results.json").read_text())
    (config.out / "results.md").write_text(markdown.render(doc))
    plots.render(doc, config.out)
    problems = validate(doc)
    for problem in problems:
        print(f"malformed result: {problem}", file=sys.stderr)
    print(f"wrote {config.out}/results.json, results.md, convergence.png, changes.png")
    del result
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
