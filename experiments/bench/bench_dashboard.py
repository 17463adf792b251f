"""Feature-dashboard generation time (issue: notebooks, experiments and a dashboard).

    python experiments/bench/bench_dashboard.py [--dictionary DIR] [--tokens 200k] [--n 20] [--screenshot PNG]

Builds the page of a trained dictionary (default: the k=32, 8192-latent SAE of
``interp experiment run experiments/sae_pareto.toml``) from its existing store, with ``--n``
top-activating contexts per latent over the last ``--tokens`` store rows, and times it against
the floor any dashboard pays on the same rows, measured in the same run:
  encode only     read the rows from the store and run the dictionary's encoder over them  <- baseline
  dashboard       interp.viz.build_dashboard: the same scan keeping every non-zero activation, top
                  contexts, activation histograms, window activations, decoded tokens through the
                  unembedding, and the page written to disk
Goal: under a minute on 2 CPU cores for 8192 latents with 20 contexts each.
``--screenshot`` opens the page in headless Chromium and saves a PNG (for the README).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "runs" / "bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dictionary", type=Path, default=ROOT / "runs/experiments/sae_pareto/interp/sae-topk-k32-8192")
    parser.add_argument("--store", type=Path, default=None, help="default: the dictionary's training store")
    parser.add_argument("--tokens", default="200k", help="store rows to read (the last N)")
    parser.add_argument("--n", type=int, default=20, help="top-activating contexts per latent")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--screenshot", type=Path, default=None, help="save a screenshot of the page here")
    parser.add_argument("--out", type=Path, default=RESULTS / "dashboard.json")
    args = parser.parse_args()

    from timing import interleaved, report

    from interp.config import parse_count
    from interp.dictionary.features import DictionaryFeatures, scan_rows
    from interp.dictionary.io import load_dictionary, read_meta
    from interp.errors import InputError
    from interp.models import load_model
    from interp.store import ActivationStore
    from interp.viz import build_dashboard

    if not (args.dictionary / "dictionary.json").is_file():
        raise InputError(f"{args.dictionary} is no dictionary; run `interp experiment run experiments/sae_pareto.toml` "
                         "first or pass --dictionary")
    meta = read_meta(args.dictionary)
    store = ActivationStore(args.store or meta["store"])
    dictionary = load_dictionary(args.dictionary, d_in=store.d(meta["config"]["input_site"]))
    source = DictionaryFeatures(dictionary, name=args.dictionary.name)
    model = load_model(source.model or store.manifest["model"]["name"])
    rows = scan_rows(store, parse_count(args.tokens))
    scratch = Path(tempfile.mkdtemp())
    page = scratch / f"{args.dictionary.name}.html"

    @torch.no_grad()
    def encode_only() -> None:
        for x in store.batches(source.site, 4096, rows=rows):
            dictionary.encode(x)

    def dashboard() -> None:
        build_dashboard(source, store, page, model=model, rows=rows, n=args.n, progress=False)

    print(f"{dictionary.config.n_latents} latents, {args.n} contexts each, store rows {rows[0]:,}..{rows[1]:,} "
          f"({rows[1] - rows[0]:,} tokens), {torch.get_num_threads()} threads")
    timed = interleaved({"encode only (store read + encoder)": encode_only, "dashboard (build_dashboard)": dashboard},
                        repeats=args.repeats, warmup=0)
    seconds = min(timed["dashboard (build_dashboard)"])
    result = report(f"Dashboard of {args.dictionary.name}, {rows[1] - rows[0]:,} tokens", timed,
                    "encode only (store read + encoder)", out=args.out,
                    extra={"latents": dictionary.config.n_latents, "contexts_per_latent": args.n, "tokens": rows[1] - rows[0],
                           "page_mb": page.stat().st_size / 1e6, "goal_s": 60})
    median = next(r["median_s"] for r in result["rows"] if r["case"].startswith("dashboard"))
    print(f"dashboard: median {median:.1f} s, fastest {seconds:.1f} s (goal < 60 s); page {page.stat().st_size / 1e6:.1f} MB")
    if args.screenshot:
        screenshot(page, args.screenshot)


def screenshot(page: Path, png: Path) -> None:
    """The page in headless Chromium with a mid-density latent selected, saved as a PNG."""
    from selenium.webdriver.common.by import By

    from interp.viz.browser import headless_chromium

    with headless_chromium(1400, 900) as driver:
        driver.get(page.as_uri())
        driver.find_element(By.ID, "sort").send_keys("sort by firing density")
        items = driver.find_elements(By.CSS_SELECTOR, "#list li")
        items[min(len(items) - 1, 12)].click()
        time.sleep(0.5)
        png.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(png))
        problems = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    print(f"wrote {png}" + (f"; console errors: {problems}" if problems else ""))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
