"""Small statistics used by every scenario: percentiles of samples and of histograms.

Percentiles of samples use the nearest-rank method on sorted values (no interpolation,
so a reported p99 is a latency that was actually observed). Percentiles of a Prometheus
histogram interpolate linearly inside the bucket, as PromQL's `histogram_quantile`
does, which is how clusterloader2 and dashboards read kube-proxy's own histograms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, p50, p90, p99, max of `values` (seconds)."""
    return {
        "count": len(values),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


_BUCKET = re.compile(r"^(?P<name>\w+)_bucket\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.MULTILINE)


def histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) of metric `name` in an exposition."""
    buckets: dict[float, float] = {}
    for match in _BUCKET.finditer(text):
        if match.group("name") != name:
            continue
        labels = dict(
            part.split("=", 1) for part in match.group("labels").split(",") if "=" in part
        )
        bound = labels.get("le", "").strip('"')
        if bound:
            buckets[float(bound)] = buckets.get(float(bound), 0.0) + float(match.group("value"))
    return buckets


def histogram_delta(
    after: Mapping[float, float], before: Mapping[float, float]
) -> dict[float, float]:
    """The observations made between two scrapes of the same histogram."""
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def histogram_quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """PromQL's `histogram_quantile` over cumulative buckets; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # PromQL answers the highest finite bound
            inside = count - lower_count
            fraction = (rank - lower_count) / inside if inside else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound
