"""A benchmark script of experiments/bench/ run as an experiment: its ratio tables as metrics and figures.

The script runs in a subprocess with ``--out RESULTS/bench.json`` plus the file's ``args``; its
printed output goes to ``RESULTS/output.txt``. Every table the script writes into its JSON (an
object with ``title``, ``baseline`` and ``rows`` of ``case`` / ``median_s`` / ``ratio``, as
``experiments/bench/timing.py``'s ``report`` returns) becomes one panel of ``figures/ratios``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.errors import InputError
from interp.experiments import register
from interp.experiments.results import Results

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench"


@dataclass
class BenchmarkParams:
    script: str  # a file name in experiments/bench/
    args: list[str] = field(default_factory=list)
    timeout_s: int = 4 * 3600


@register("benchmark", BenchmarkParams)
def run(params: BenchmarkParams, results: Results) -> dict[str, Any]:
    """A benchmark of experiments/bench/ (timing ratios against a baseline measured in the same run)."""
    script = BENCH / params.script
    if not script.is_file():
        found = sorted(p.name for p in BENCH.glob("bench_*.py")) if BENCH.is_dir() else []
        raise InputError(f"benchmark script {script} not found; experiments/bench/ has: {', '.join(found) or 'nothing'}")
    out = results.path("bench.json")
    command = [sys.executable, str(script), "--out", str(out), *params.args]
    with open(results.path("output.txt"), "w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=params.timeout_s)
        log.write(done.stdout)
    print(done.stdout[-4000:])
    if done.returncode != 0:
        raise InputError(f"{params.script} exited with status {done.returncode}; its output is in {results.path('output.txt')}")
    raw = json.loads(out.read_text())
    tables = list(ratio_tables(raw))
    if not tables:
        raise InputError(f"{params.script} wrote no ratio table (title, baseline, rows) into its JSON")
    results.figure("ratios", ratio_figure(tables, params.script))
    summary = [{"title": t["title"], "baseline": t["baseline"],
                "rows": [{"case": r["case"], "median_s": r["median_s"], "ratio": r["ratio"]} for r in t["rows"]]} for t in tables]
    return {"script": params.script, "command": " ".join(command[1:]), "tables": summary, "raw": raw}


def ratio_tables(value: Any):
    """Every ``{"title", "baseline", "rows"}`` object inside a benchmark's JSON, depth first."""
    if isinstance(value, dict):
        if {"title", "baseline", "rows"} <= set(value):
            yield value
            return
        for item in value.values():
            yield from ratio_tables(item)
    elif isinstance(value, list):
        for item in value:
            yield from ratio_tables(item)


def ratio_figure(tables: list[dict[str, Any]], script: str) -> Any:
    """One horizontal bar panel per table: each case's median time divided by the baseline's."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=len(tables), cols=1, subplot_titles=[f"{t['title']} (baseline: {t['baseline']})" for t in tables],
                        vertical_spacing=0.45 / len(tables))
    for i, table in enumerate(tables, start=1):
        cases = [r["case"] for r in table["rows"]][::-1]
        ratios = [r["ratio"] for r in table["rows"]][::-1]
        fig.add_trace(go.Bar(x=ratios, y=cases, orientation="h", text=[f"{r:.2f}x" for r in ratios], textposition="outside",
                             marker_color="#4c78a8", showlegend=False, cliponaxis=False), row=i, col=1)
        fig.update_xaxes(type="log", row=i, col=1)
    fig.update_xaxes(title_text="time / baseline time (log scale; lower is faster)", row=len(tables), col=1)
    fig.update_layout(title=f"{script}: ratios to a baseline timed in the same run", margin={"l": 260, "r": 60},
                      height=120 + 220 * len(tables))
    return fig
