"""PNG copies of the probe and steering plots shown in the README, redrawn from the run folders.

    python experiments/steering_figures.py [--runs runs] [--out experiments/figures]

Reads ``RUNS/probe-sentiment``, ``RUNS/probe-space`` (``interp probe``) and
``RUNS/steering-sentiment/test`` (``experiments/steering_sentiment.py``) and writes
``probes_sentiment.png``, ``probes_space.png`` and ``steering_sentiment.png`` (needs kaleido and a
Chromium; see ``make browser``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("experiments/figures"))
    args = parser.parse_args()

    from interp.probes import ProbeResults
    from interp.steering import VaderScorer
    from interp.steering.sweep import SweepResult

    args.out.mkdir(parents=True, exist_ok=True)
    for concept in ("sentiment", "space"):
        table = pd.read_csv(args.runs / f"probe-{concept}" / "table.csv")
        ProbeResults(table, {}, concept).plot().write_image(args.out / f"probes_{concept}.png", width=900, height=420)
    folder = args.runs / "steering-sentiment" / "test"
    result = SweepResult(pd.read_csv(folder / "table.csv"), pd.read_json(folder / "generations.jsonl", lines=True),
                         VaderScorer.description)
    result.plot().write_image(args.out / "steering_sentiment.png", width=1400, height=460)
    print(f"wrote {args.out}/probes_sentiment.png, probes_space.png, steering_sentiment.png")


if __name__ == "__main__":
    main()
