"""The grid runner: for each point one lab, for each backend one proxy, every scenario in turn.

Order: points from smallest to largest; at each point one `BenchLab` is built and
populated once, then each backend in turn starts its proxy on a node holding no rules
of ours, is measured, and is stopped and cleaned up (`--cleanup`) before the next.
A backend that misses the convergence deadline at one point is not run at larger
points (reported `skipped`, naming the point it missed); the grid goes on for the others.

Each point holds, besides its `services x endpoints`, the probe Service (1 endpoint)
and `CHURN_SERVICES` churn Services (1 endpoint each) on the spare pods: the read-back
expects all of them.

Results are written to `<out>/results.json` after every point, so a run cut short keeps
what it measured; the Markdown and plots are rendered from that file at the end.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

from benchmarks import cluster_wide, upstream
from benchmarks.backends import Backend, count_upstream_endpoints
from benchmarks.cluster import REPO, BenchLab, ProxyRun, add_service, bench_lab, populate
from benchmarks.floors import kernel_floor, upstream_floor
from benchmarks.grid import Config, Point
from benchmarks.progress import Progress, weight
from benchmarks.results import PointResult, RunResult
from benchmarks.scenarios import (
    CHURN_SERVICES,
    ProxyDiedError,
    burst,
    churn,
    churn_services,
    converge,
    kernel_matches,
    one_change,
    probe_service,
)
from benchmarks.workload import REAL_PODS, ServiceSpec, endpoint_addresses, services
from lab.netns import CLUSTER_CIDR

VIP_SAMPLE = 50
LOCK_BUSY = "xtables lock busy"
"""What the proxy logs when another process holds the host-wide xtables lock."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_grid(
    config: Config, backends: list[Backend], result: RunResult, progress: Progress
) -> None:
    random.seed(config.seed)
    missed: dict[str, str] = {}
    churn_point = config.churn_at()
    result.churn_point = churn_point.label if churn_point else ""
    for point in config.points:
        progress.set(point=point.label, phase="building the lab")
        logs = config.out / "logs" / point.label
        with bench_lab(min(point.endpoints, REAL_PODS), keep_logs=logs) as lab:
            specs = services(point.services, endpoint_addresses(lab.endpoint_ips, point.endpoints))
            progress.set(phase=f"populating the API ({point.services} services)")
            populate(lab, specs)
            add_service(lab, *probe_service(lab, point.services))
            first_churn = point.services + 1 + 200  # after the probe and the added services
            for spec, body in churn_services(lab, first_churn):
                add_service(lab, spec, body)
            expected = point.size + 1 + CHURN_SERVICES
            if config.kopf:
                progress.set(phase="kopf on.event ingest of the same objects")
                count = point.services + 1 + CHURN_SERVICES
                result.kopf[point.label] = kopf_ingest(lab, config.kopf, count)
                progress.result(f"{point.label}: kopf on.event: {result.kopf[point.label]}")
            for backend in backends:
                entry = PointResult(backend.name, point.services, point.endpoints)
                result.points.append(entry)
                if backend.name in missed:
                    entry.status = "skipped"
                    entry.detail = f"missed the deadline at {missed[backend.name]}"
                    progress.result(f"{backend.name} {point.label}: {entry.detail}")
                else:
                    measure_point(
                        config,
                        lab,
                        backend,
                        point,
                        specs,
                        expected,
                        entry,
                        progress,
                        result,
                        first_churn if point == churn_point else None,
                    )
                    if entry.status == "deadline":
                        missed[backend.name] = point.label
                progress.advance(weight(point))
                result.write(config.out / "results.json")
    if config.nodes:
        for backend in backends:
            progress.set(backend=backend.name, point=f"{config.nodes} nodes", phase="cluster-wide")
            result.cluster[backend.name] = cluster_wide.measure(
                config, backend, progress, keep_logs=config.out / "logs" / "cluster"
            )
            result.write(config.out / "results.json")


def kopf_ingest(lab: BenchLab, python: str, objects: int) -> dict[str, Any]:
    """Run `benchmarks.kopf_ingest` with `python` in the node namespace; what it printed."""
    argv = ["ip", "netns", "exec", lab.topology.node_ns, python, "-m", "benchmarks.kopf_ingest"]
    env = {**os.environ, "KUBECONFIG": str(lab.kubeconfig), "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(
            [*argv, str(objects), str(objects)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "detail": "did not finish in 900 s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"ok": False, "detail": done.stderr[-300:]}
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


def measure_point(
    config: Config,
    lab: BenchLab,
    backend: Backend,
    point: Point,
    specs: list[ServiceSpec],
    expected: int,
    entry: PointResult,
    progress: Progress,
    result: RunResult,
    churn_vip: int | None,
) -> None:
    """Every scenario of one backend at one point; fills `entry` (and the churn results)."""
    vips = [s.vip for s in random.sample(specs, min(VIP_SAMPLE, len(specs)))]
    probe_vips = vips if point.endpoints <= REAL_PODS else []
    run: ProxyRun | None = None
    try:
        for repetition in range(config.repeat):
            progress.set(
                backend=backend.name, phase=f"first convergence {repetition + 1}/{config.repeat}"
            )
            began = time.monotonic()
            run = ProxyRun(
                lab,
                backend,
                sync_period=config.sync_period,
                min_sync_period=config.min_sync_period,
                tag=f"{backend.name}-{point.label}-{repetition}",
            )
            conv, saved = converge(
                lab,
                run,
                expected=expected,
                deadline=config.deadline,
                probe_vips=probe_vips,
                settle=config.settle,
                on_tick=lambda: progress.note(f"{time.monotonic() - began:.0f} s"),  # noqa: B023
            )
            entry.convergence.append(conv)
            if conv.status != "ok":
                entry.status, entry.detail = conv.status, conv.detail
                progress.result(f"{backend.name} {point.label}: {conv.status}: {conv.detail}")
                return
            progress.set(phase="kernel floor (raw restore of the same ruleset)")
            floor = kernel_floor(lab.topology.prefix, backend, saved, expected)
            entry.floor.append(floor)
            ratio = (
                f"{conv.seconds / floor.seconds:.2f}"
                if floor.ok and floor.seconds and conv.seconds
                else "n/a"
            )
            progress.result(
                f"{backend.name} {point.label}: converged in {conv.seconds:.2f} s, floor "
                f"{floor.seconds or float('nan'):.2f} s, ratio {ratio}; "
                f"RSS {conv.rss_steady_mib:.0f}/{conv.rss_peak_mib:.0f} MiB; "
                f"list+watch CPU {conv.cpu_list_watch or 0:.2f} s"
                + ("" if floor.ok else f" (floor failed: {floor.detail})")
            )
            if repetition + 1 < config.repeat:
                run.stop()
                run = None
        assert run is not None
        if config.upstream and backend.upstream:
            progress.set(phase="upstream layout floor")
            text = upstream.ruleset(specs, cluster_cidr=CLUSTER_CIDR)
            entry.upstream = upstream_floor(
                lab.topology.prefix, backend, text, point.size, count_upstream_endpoints
            )
            progress.result(
                f"{backend.name} {point.label}: upstream layout restored in "
                f"{entry.upstream.seconds or float('nan'):.2f} s"
                + ("" if entry.upstream.ok else f" (failed: {entry.upstream.detail})")
            )
        progress.set(phase=f"one change at a time ({config.samples} samples of each)")
        entry.changes = one_change(
            lab,
            run,
            services=point.services,
            samples=config.samples,
            sync_period=config.sync_period,
            spacing=config.spacing,
            min_sync_period=config.min_sync_period,
            on_sample=lambda n: progress.note(f"{n}/{config.samples}"),
        )
        summary = entry.summary()["changes"]
        progress.result(
            f"{backend.name} {point.label}: one change p50/p99 ms: "
            + ", ".join(
                f"{kind} {1000 * (f['p50'] or 0):.0f}/{1000 * (f['p99'] or 0):.0f}"
                + (f" ({f['lost']} lost)" if f["lost"] else "")
                for kind, f in summary.items()
            )
        )
        if churn_vip is not None:
            progress.set(phase=f"churn {config.churn_rate:g}/s for {config.churn_seconds:g} s")
            prog = churn(lab, run, churn_vip, rate=config.churn_rate, seconds=config.churn_seconds)
            result.churn[backend.name] = prog
            progress.set(phase=f"burst of {config.burst} changes")
            result.burst[backend.name] = burst(lab, run, churn_vip, count=config.burst)
            for name, p in (("churn", prog), ("burst", result.burst[backend.name])):
                s = sorted(p.latencies)
                p99 = s[min(len(s) - 1, int(0.99 * len(s)))] if s else float("nan")
                progress.result(
                    f"{backend.name} {point.label}: {name}: {p.changes} changes, {p.lost} lost, "
                    f"e2e p99 {p99:.2f} s, proxy's p99 {p.proxy_histogram.get('p99')}"
                )
        ok, found = kernel_matches(lab, backend, expected)
        if not ok:
            entry.status = "failed"
            entry.detail = (
                f"after the changes the kernel programs {found} endpoints, not {expected}"
            )
    except ProxyDiedError as err:
        entry.status, entry.detail = "failed", str(err)
    finally:
        if run is not None:
            progress.set(phase="stopping the proxy, --cleanup")
            run.stop()
        entry.lock_busy = sum(
            log.read_text(errors="replace").count(LOCK_BUSY)
            for log in lab.workdir.glob(f"proxy-{backend.name}-{point.label}-*.log")
        )
        if entry.lock_busy:
            progress.result(
                f"{backend.name} {point.label}: the xtables lock was held by another process "
                f"{entry.lock_busy} times during this point (contention from outside the run)"
            )


def main_run(
    config: Config, backends: list[Backend], skipped: list[str], argv: list[str]
) -> RunResult:
    config.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", "-m", "benchmarks", *argv])
    result = RunResult(command=command, started=now(), config=config_doc(config))
    result.skipped = skipped
    total = sum(weight(p) for p in config.points) * len(backends) + config.nodes * len(backends)
    with Progress(total) as progress:
        for line in skipped:
            progress.result(line)
        try:
            run_grid(config, backends, result, progress)
        finally:
            result.finished = now()
            result.write(config.out / "results.json")
    return result


def config_doc(config: Config) -> dict[str, object]:
    doc: dict[str, object] = {}
    for key, value in vars(config).items():
        if isinstance(value, Point):
            doc[key] = value.label
        elif isinstance(value, tuple) and value and isinstance(value[0], Point):
            doc[key] = [p.label for p in value]
        else:
            doc[key] = value if not hasattr(value, "__fspath__") else str(value)
    doc["python"] = sys.version.split()[0]
    return doc
