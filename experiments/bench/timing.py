"""Timing helpers shared by the benchmarks: interleaved repeats, medians, a ratio table."""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def interleaved(cases: dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 1) -> dict[str, list[float]]:
    """Run every case ``repeats`` times, in rounds of every case, each round in a new (seeded)
    random order: drift, position in the round and what ran just before (a multi-threaded
    case can slow the next one by 10%) then hit all cases alike; seconds per run."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in cases}
    rng = random.Random(0)
    for _ in range(repeats):
        for name in rng.sample(names, len(names)):
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


def report(title: str, times: dict[str, list[float]], baseline: str, *, targets: dict[str, float] | None = None,
           out: Path | None = None, extra: dict | None = None) -> dict:
    """Print median seconds and the ratio to ``baseline`` for each case; optionally write JSON."""
    base = statistics.median(times[baseline])
    rows = []
    print(f"\n{title}\n{'case':52s} {'median s':>9s} {'ratio':>7s} {'target':>7s}")
    for name, values in times.items():
        median = statistics.median(values)
        target = (targets or {}).get(name)
        ratio = median / base
        verdict = "" if target is None else ("  ok" if ratio <= target else "  MISSED")
        print(f"{name:52s} {median:9.4f} {ratio:7.3f} {'' if target is None else f'<={target:.2f}':>7s}{verdict}")
        rows.append({"case": name, "median_s": median, "ratio": ratio, "target": target, "all_s": values})
    result = {"title": title, "baseline": baseline, "rows": rows, **(extra or {})}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result
