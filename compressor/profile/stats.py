"""The spread of repeated timings, and when a difference between two of them is below the noise.

Timings are summarised by their median and interquartile range (IQR, the 25th to 75th
percentile): robust to the odd slow call and meaningful from a handful of calls. Two medians are
"within noise" of each other when their IQRs overlap: the run-to-run scatter is then as large as
the difference, so its sign and size are not measured facts (on a shared CPU, merge overheads of
+46% and -11% came out of one report before this rule).
"""

from __future__ import annotations

import statistics

import numpy as np

__all__ = ["spread", "iqr_overlap", "latencies_within_noise", "share_within_noise"]


def spread(values: list[float]) -> dict:
    """``{median, q1, q3, min, max, p90}`` of ``values`` (linear interpolation between ranks)."""
    if not values:
        raise ValueError("spread of no values")
    q1, q3, p90 = np.percentile(values, [25, 75, 90]).tolist()
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values), "p90": p90}


def iqr_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether the closed intervals ``a = (lo, hi)`` and ``b`` share a point."""
    return a[0] <= b[1] and b[0] <= a[1]


def latencies_within_noise(a: dict, b: dict) -> bool | None:
    """Two timing rows (``latency_ms_q1`` / ``latency_ms_q3``): do their IQRs overlap? None when
    either row has no numbers."""
    keys = ("latency_ms_q1", "latency_ms_q3")
    if any(r.get(k) is None for r in (a, b) for k in keys):
        return None
    return iqr_overlap((a["latency_ms_q1"], a["latency_ms_q3"]), (b["latency_ms_q1"], b["latency_ms_q3"]))


def share_within_noise(share: dict) -> bool:
    """A share measured call by call (``share``: a :func:`spread`, e.g. the time inside the merges
    over the forward's) is below the noise when its call-to-call IQR is wider than its median:
    the calls disagree by more than the quantity itself."""
    return share["q3"] - share["q1"] > share["median"]
