"""kopf's `@kopf.on.event` ingesting the same Services and EndpointSlices as our watch path.

    KUBECONFIG=... PYTHON_WITH_KOPF -m benchmarks.kopf_ingest SERVICES SLICES

Run by `benchmarks.run` (when `--kopf PYTHON` names an interpreter that has kopf; kopf
is not a dependency of this project) in the lab's node namespace, against the same API
holding the same objects the proxy listed. Starts a standalone, cluster-wide kopf
operator with one `on.event` handler per resource, and stops it once it has seen every
object. Prints one JSON line: wall and CPU seconds from process start (interpreter
start-up and imports included, as in the proxy's figure), peak RSS, events counted.
The proxy's matching figure is its CPU when both its initial lists are in.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

STARTED = time.monotonic()


def peak_rss_mib() -> float:
    """VmHWM of this process (not ru_maxrss: that keeps the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str]) -> int:
    kopf = importlib.import_module("kopf")  # not a dependency: only this script needs it
    want = {"services": int(argv[0]), "endpointslices": int(argv[1])}
    seen: dict[str, set[str]] = {"services": set(), "endpointslices": set()}
    stop = threading.Event()
    done_at: list[float] = []
    at_done: list[resource.struct_rusage] = []

    def count(kind: str, body: Any) -> None:
        meta = body.get("metadata", {})
        seen[kind].add(f"{meta.get('namespace')}/{meta.get('name')}")
        if not done_at and all(len(seen[k]) >= want[k] for k in want):
            done_at.append(time.monotonic())
            at_done.append(resource.getrusage(resource.RUSAGE_SELF))
            stop.set()

    def on_service(body: Any, **_: Any) -> None:
        count("services", body)

    def on_slice(body: Any, **_: Any) -> None:
        count("endpointslices", body)

    def quiet(settings: Any, **_: Any) -> None:
        settings.posting.enabled = False  # no Events written back to the API

    # Registered by calling the decorators (kopf is untyped here: it is imported at run time).
    kopf.on.event("v1", "services")(on_service)
    kopf.on.event("discovery.k8s.io", "v1", "endpointslices")(on_slice)
    kopf.on.startup()(quiet)
    deadline = threading.Timer(600.0, stop.set)
    deadline.daemon = True
    deadline.start()
    kopf.run(standalone=True, clusterwide=True, stop_flag=stop)
    usage = at_done[0] if at_done else resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "ok": bool(done_at),
                "wall_seconds": (done_at[0] if done_at else time.monotonic()) - STARTED,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "peak_rss_mib": peak_rss_mib(),
                "services": len(seen["services"]),
                "endpointslices": len(seen["endpointslices"]),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
