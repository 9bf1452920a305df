"""The measurements of one backend at one grid point, each verified by the kernel or a packet.

Called in order by the runner (`benchmarks.run`) with one live `ProxyRun`:

1. `converge`: start the proxy on a node holding no rules of ours; seconds from the
   process start to the commit of its first full sync (its own
   `..._last_timestamp_seconds`, read once the "synced fully" line appears: scraping
   /metrics while it syncs would take the GIL from what is being timed); CPU seconds
   when both initial lists are done (the list + watch cost) and at convergence; RSS
   steady (2 s after) and peak; the peak RSS of the tools it spawned. Verified by
   reading the kernel back: the endpoints our ruleset programs must equal the API's.
2. `one_change`: a probe Service on two spare pods and a Service created per sample,
   changed one at a time: add an endpoint, remove one, mark one unready, add a service.
   Latency is API write -> the kernel forwards by the new rule, seen by TCP connections
   from the client namespace (a packet verifies every sample): an added endpoint or
   service counts as programmed at the first connection it answers; a removed or unready
   endpoint at the first of `STREAK` consecutive connections that all avoided it (the
   chance that the old rules produce such a streak is 2**-24; the streak may have begun a
   few connections, about 3 ms each, before the rule changed, which matters only when
   the latency itself is a few ms). The next change is
   written 1.1-1.6 s after the last one was seen, past the proxy's default
   --iptables-min-sync-period (1 s), so each is measured alone; periodic syncs (the
   harness runs the proxy with a short --iptables-sync-period) fall inside the run.
   Adding a service is two API events (the Service, then its EndpointSlice): the proxy
   syncs the first at once and the second one min sync period later, so with the
   default of 1 s an added service answers about 1 s after its write; that is the
   proxy's (and upstream's runner's) behaviour, measured as is. Deleting one is two
   events too, so the next change waits one min sync period more.
3. `churn` and `burst`: `CHURN_SERVICES` single-endpoint services whose endpoint moves
   to the next port of a spare pod at each change; the echo reply names the port, so a
   connection tells exactly which generation of that service's endpoint the kernel
   holds. Churn writes `rate` changes/s for `seconds`; burst writes `count` changes back
   to back. A change counts as programmed when its generation, or a later one, answers.
   Reported end to end next to the proxy's own
   `kubeproxy_network_programming_duration_seconds` over the same window.

Threads: `churn` writes from a second thread while this one probes; everything else is
sequential. All loops are bounded by deadlines.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks import stats
from benchmarks.backends import Backend
from benchmarks.cluster import (
    LISTED_SERVICES,
    LISTED_SLICES,
    SPARE_PORTS,
    BenchLab,
    ProxyRun,
    add_service,
    cpu_seconds,
    delete_service,
    log_milestones,
    metric,
    replace_slice,
    rss_mib,
)
from benchmarks.workload import ServiceSpec, slice_body, vip
from lab.probe import EchoReply, probe

STREAK = 24
CHANGE_DEADLINE = 60.0
"""Seconds one change may take to be seen before it counts as lost."""
CHURN_SERVICES = 40
PROBE_SERVICE = "probe"
NPL = "kubeproxy_network_programming_duration_seconds"


class ProxyDiedError(RuntimeError):
    """The proxy process exited during a measurement."""


@dataclass
class Convergence:
    status: str = "ok"
    """ok, deadline (not converged in time), failed (read-back mismatch or proxy error)."""
    detail: str = ""
    seconds: float | None = None
    milestones: dict[str, float] = field(default_factory=dict)
    cpu_list_watch: float | None = None
    cpu_converge: float | None = None
    rss_steady_mib: float | None = None
    rss_peak_mib: float | None = None
    tool_peak_mib: float | None = None
    expected_endpoints: int = 0
    read_back_endpoints: int = 0
    vips_probed: int = 0
    vips_answering: int = 0


def converge(
    lab: BenchLab,
    run: ProxyRun,
    *,
    expected: int,
    deadline: float,
    probe_vips: list[str],
    settle: float = 2.0,
    on_tick: Callable[[], None] = lambda: None,
) -> tuple[Convergence, str]:
    """Wait for `run`'s first full sync; verify it. Returns the result and the read-back."""
    result = Convergence(expected_endpoints=expected)
    end = time.monotonic() + deadline
    while True:
        if not run.alive():
            result.status, result.detail = "failed", f"the proxy exited; see {run.log_path}"
            return result, ""
        text = run.log_text()
        if result.cpu_list_watch is None and LISTED_SERVICES in text and LISTED_SLICES in text:
            result.cpu_list_watch = cpu_seconds(run.pid)
        if "synced fully" in text:
            break
        if time.monotonic() > end:
            result.status = "deadline"
            result.detail = f"no first full sync within the {deadline:.0f} s deadline"
            return result, ""
        on_tick()
        time.sleep(0.05)
    result.cpu_converge = cpu_seconds(run.pid)
    result.milestones = log_milestones(run.log_text(), run.started)
    last_sync = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
    committed = metric(lab.metrics_text(), last_sync, combine=max)
    result.seconds = committed - run.started
    time.sleep(settle)
    result.rss_steady_mib = rss_mib(run.pid)
    result.rss_peak_mib = rss_mib(run.pid, "VmHWM")
    result.tool_peak_mib = run.sampler.tool_peak_mib or None
    saved = lab.save(run.backend)
    result.read_back_endpoints = run.backend.count(saved)
    if result.read_back_endpoints != expected:
        result.status = "failed"
        result.detail = f"read back {result.read_back_endpoints} endpoints, expected {expected}"
        return result, saved
    for address in probe_vips:
        reply = probe(lab.topology.client_ns, address, 80, "tcp", timeout=2.0)
        result.vips_answering += isinstance(reply, EchoReply)
    result.vips_probed = len(probe_vips)
    if result.vips_answering != result.vips_probed:
        result.status = "failed"
        result.detail = f"{result.vips_answering} of {result.vips_probed} probed VIPs answered"
    return result, saved


# -- one change at a time ---------------------------------------------------------------


@dataclass
class Changes:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    span_sync_periods: float = 0.0
    full_syncs: int = 0
    partial_syncs: int = 0

    def add(self, kind: str, latency: float | None) -> None:
        self.latencies.setdefault(kind, [])
        self.lost.setdefault(kind, 0)
        if latency is None:
            self.lost[kind] += 1
        else:
            self.latencies[kind].append(latency)


def probe_service_slice(lab: BenchLab, members: list[tuple[int, bool]]) -> dict[str, object]:
    """The probe Service's slice: (spare pod index, ready) pairs, on the first spare port."""
    endpoints = [(lab.spare[index][1], ready) for index, ready in members]
    return slice_body(
        PROBE_SERVICE, endpoints, node=lab.node_name, port=SPARE_PORTS[0], trigger=time.time()
    )


def _seen(client: str, address: str, accept: Callable[[EchoReply], bool], run: ProxyRun) -> float:
    """Connect until a reply is accepted; returns when the first accepted probe was sent."""
    end = time.monotonic() + CHANGE_DEADLINE
    while time.monotonic() < end:
        sent = time.monotonic()
        reply = probe(client, address, 80, "tcp", timeout=0.2)
        if isinstance(reply, EchoReply) and accept(reply):
            return sent
        if not run.alive():
            raise ProxyDiedError(f"the proxy exited; see {run.log_path}")
        # Under the node's global ICMP budget (net.ipv4.icmp_msgs_per_sec, 1000/s): a
        # faster loop would lose the "unreachable" answers and wait out timeouts instead.
        time.sleep(0.003)
    raise TimeoutError


def _avoided(client: str, address: str, pod: str, run: ProxyRun) -> float:
    """Connect until STREAK replies in a row come from anyone but `pod`; the streak's start."""
    end = time.monotonic() + CHANGE_DEADLINE
    streak_start: float | None = None
    streak = 0
    while time.monotonic() < end:
        sent = time.monotonic()
        reply = probe(client, address, 80, "tcp", timeout=0.2)
        if isinstance(reply, EchoReply) and reply.pod != pod:
            if streak == 0:
                streak_start = sent
            streak += 1
            if streak >= STREAK and streak_start is not None:
                return streak_start
        else:
            streak = 0
        if not run.alive():
            raise ProxyDiedError(f"the proxy exited; see {run.log_path}")
    raise TimeoutError


def one_change(
    lab: BenchLab,
    run: ProxyRun,
    *,
    services: int,
    samples: int,
    sync_period: float,
    spacing: tuple[float, float] = (1.1, 1.6),
    min_sync_period: float = 1.0,
    on_sample: Callable[[int], None] = lambda _n: None,
) -> Changes:
    """`samples` of each kind of change, one at a time; see the module docstring."""
    result = Changes()
    client = lab.topology.client_ns
    target = vip(services)
    names = [name for name, _ in lab.spare]
    before = lab.metrics_text()
    began = time.monotonic()

    def timed(kind: str, body: dict[str, object], check: Callable[[], float]) -> None:
        written = time.monotonic()
        replace_slice(lab, body)
        try:
            result.add(kind, check() - written)
        except TimeoutError:
            result.add(kind, None)
        time.sleep(random.uniform(*spacing))

    a, b = 0, 1  # the probe Service starts on spare pod 0 (see `ensure_probe_service`)
    for number in range(samples):
        timed(
            "add endpoint",
            probe_service_slice(lab, [(a, True), (b, True)]),
            lambda: _seen(client, target, lambda r: r.pod == names[b], run),  # noqa: B023
        )
        timed(
            "remove endpoint",
            probe_service_slice(lab, [(b, True)]),
            lambda: _avoided(client, target, names[a], run),  # noqa: B023
        )
        # Back to two endpoints (not sampled), then one of them turns unready.
        replace_slice(lab, probe_service_slice(lab, [(b, True), (a, True)]))
        _seen(client, target, lambda r: r.pod == names[a], run)  # noqa: B023
        time.sleep(random.uniform(*spacing))
        timed(
            "unready endpoint",
            probe_service_slice(lab, [(b, True), (a, False)]),
            lambda: _avoided(client, target, names[a], run),  # noqa: B023
        )
        replace_slice(lab, probe_service_slice(lab, [(b, True)]))  # no kernel change
        time.sleep(random.uniform(*spacing))  # it may still cost a sync
        # One new service on spare pod 2, seen answering; then removed (not sampled).
        name = f"added{number}"
        spec = ServiceSpec(name, vip(services + 1 + number % 200), ())
        body = slice_body(name, [(lab.spare[2][1], True)], node=lab.node_name, port=SPARE_PORTS[0])
        written = time.monotonic()
        add_service(lab, spec, body)
        try:
            seen = _seen(client, spec.vip, lambda r: r.pod == names[2], run)
            result.add("add service", seen - written)
        except TimeoutError:
            result.add("add service", None)
        time.sleep(random.uniform(*spacing))
        # Two events (slice, then service): the second is synced up to one min sync
        # period after the first, and the next change must not wait behind it.
        delete_service(lab, name)
        time.sleep(min_sync_period + random.uniform(*spacing))
        a, b = b, a
        on_sample(number + 1)
    result.span_sync_periods = (time.monotonic() - began) / sync_period
    after = lab.metrics_text()
    full = "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
    partial = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
    result.full_syncs = int(metric(after, full) - metric(before, full))
    result.partial_syncs = int(metric(after, partial) - metric(before, partial))
    # Leave the probe Service as the next backend finds it: one endpoint on spare pod 0.
    if a != 0:
        replace_slice(lab, probe_service_slice(lab, [(0, True)]))
        time.sleep(1.2)
    return result


def probe_service(lab: BenchLab, services: int) -> tuple[ServiceSpec, dict[str, object]]:
    """The probe Service (one endpoint on spare pod 0): spec and slice, for `populate`."""
    spec = ServiceSpec(PROBE_SERVICE, vip(services), ())
    return spec, probe_service_slice(lab, [(0, True)])


# -- churn and burst --------------------------------------------------------------------


@dataclass
class Programming:
    """End-to-end network programming of many changes, next to the proxy's histogram."""

    changes: int = 0
    latencies: list[float] = field(default_factory=list)
    lost: int = 0
    wall_seconds: float = 0.0
    """First write -> last change seen."""
    proxy_histogram: dict[str, float | None] = field(default_factory=dict)
    """p50/p90/p99 and count of kubeproxy_network_programming_duration_seconds, same window."""
    rate: float = 0.0
    """Changes per second actually written."""


def churn_service_name(index: int) -> str:
    return f"churn{index}"


def churn_slice(
    lab: BenchLab, index: int, generation: int, *, stamp: bool, prefix: str = "churn"
) -> dict[str, object]:
    spare_ip = lab.spare[index % 2][1]
    port = SPARE_PORTS[generation % len(SPARE_PORTS)]
    return slice_body(
        f"{prefix}{index}",
        [(spare_ip, True)],
        node=lab.node_name,
        port=port,
        trigger=time.time() if stamp else None,
    )


def churn_services(lab: BenchLab, first_vip: int) -> list[tuple[ServiceSpec, dict[str, object]]]:
    """The churn Services (generation 0), for `populate`."""
    return [
        (
            ServiceSpec(churn_service_name(i), vip(first_vip + i), ()),
            churn_slice(lab, i, 0, stamp=False),
        )
        for i in range(CHURN_SERVICES)
    ]


class Generations:
    """What was written to each churn service, and what the kernel was seen to hold."""

    def __init__(self, first_vip: int, services: int = CHURN_SERVICES) -> None:
        self.lock = threading.Lock()
        self.first_vip = first_vip
        self.written = [0] * services
        self.pending: list[list[tuple[int, float]]] = [[] for _ in range(services)]
        self.latencies: list[float] = []

    def next_generation(self, index: int) -> int:
        with self.lock:
            self.written[index] += 1
            return self.written[index]

    def record(self, index: int, generation: int, written: float) -> None:
        """Generation `generation` of service `index` was written at `written`."""
        with self.lock:
            self.written[index] = max(self.written[index], generation)
            self.pending[index].append((generation, written))

    def write(self, lab: BenchLab, index: int) -> None:
        generation = self.next_generation(index)
        body = churn_slice(lab, index, generation, stamp=True)
        written = time.monotonic()
        replace_slice(lab, body)
        self.record(index, generation, written)

    def observe(self, index: int, port: int, when: float) -> None:
        """A reply on `port`: the generation it stands for, and every one before it, is in."""
        with self.lock:
            queue = self.pending[index]
            if not queue:
                return
            slot = SPARE_PORTS.index(port)
            # The newest written generation that maps to this port (ports repeat every 64).
            newest = self.written[index]
            seen = newest - ((newest - slot) % len(SPARE_PORTS))
            done = [(g, t) for g, t in queue if g <= seen]
            self.pending[index] = [(g, t) for g, t in queue if g > seen]
            self.latencies.extend(when - t for _, t in done)

    def waiting(self) -> list[int]:
        with self.lock:
            return [i for i, queue in enumerate(self.pending) if queue]


def probe_round(lab: BenchLab, gens: Generations) -> None:
    for index in gens.waiting():
        sent = time.monotonic()
        reply = probe(lab.topology.client_ns, vip(gens.first_vip + index), 80, "tcp", timeout=0.3)
        if isinstance(reply, EchoReply) and reply.port in SPARE_PORTS:
            gens.observe(index, reply.port, sent)


def _programming(
    lab: BenchLab,
    run: ProxyRun,
    first_vip: int,
    write: Callable[[Generations], int],
) -> Programming:
    result = Programming()
    before = stats.histogram(lab.metrics_text(), NPL)
    gens = Generations(first_vip)
    began = time.monotonic()
    writer_done = threading.Event()
    written = [0]

    def writer() -> None:
        try:
            written[0] = write(gens)
        finally:
            writer_done.set()

    thread = threading.Thread(target=writer, name="churn-writer", daemon=True)
    thread.start()
    write_end = None
    last_seen = began
    while True:
        if not run.alive():
            raise ProxyDiedError(f"the proxy exited; see {run.log_path}")
        count = len(gens.latencies)
        probe_round(lab, gens)
        if len(gens.latencies) > count:
            last_seen = time.monotonic()
        if writer_done.is_set():
            write_end = write_end or time.monotonic()
            if not gens.waiting() or time.monotonic() - write_end > CHANGE_DEADLINE:
                break
        time.sleep(0.002)
    thread.join()
    result.changes = written[0]
    result.latencies = gens.latencies
    result.lost = sum(len(queue) for queue in gens.pending)
    result.wall_seconds = last_seen - began
    result.rate = written[0] / max(1e-9, (write_end or began) - began)
    time.sleep(0.5)  # the histogram is observed after the commit, just after the packet
    delta = stats.histogram_delta(stats.histogram(lab.metrics_text(), NPL), before)
    result.proxy_histogram = {
        "count": max(delta.values(), default=0.0),
        "p50": stats.histogram_quantile(delta, 0.5),
        "p90": stats.histogram_quantile(delta, 0.9),
        "p99": stats.histogram_quantile(delta, 0.99),
    }
    return result


def churn(
    lab: BenchLab, run: ProxyRun, first_vip: int, *, rate: float, seconds: float
) -> Programming:
    """`rate` changes/s, round robin over the churn services, for `seconds`."""

    def write(gens: Generations) -> int:
        start = time.monotonic()
        total = round(rate * seconds)
        for number in range(total):
            due = start + number / rate
            time.sleep(max(0.0, due - time.monotonic()))
            gens.write(lab, number % CHURN_SERVICES)
        return total

    return _programming(lab, run, first_vip, write)


def burst(lab: BenchLab, run: ProxyRun, first_vip: int, *, count: int) -> Programming:
    """`count` changes written back to back, round robin over the churn services."""

    def write(gens: Generations) -> int:
        for number in range(count):
            gens.write(lab, number % CHURN_SERVICES)
        return count

    return _programming(lab, run, first_vip, write)


def kernel_matches(lab: BenchLab, backend: Backend, expected: int) -> tuple[bool, int]:
    """Read the kernel back: does it program exactly `expected` endpoints?"""
    found = backend.count(lab.save(backend))
    return found == expected, found
