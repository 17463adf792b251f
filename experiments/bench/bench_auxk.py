"""AuxK's reconstruction: dense matmuls against the sparse kernels, by the number of dead latents.

    python experiments/bench/bench_auxk.py [--repeats 7]

Forward and backward (to the weights and the encoder input) of ``auxk_reconstruction`` at the
quick start's shapes (1,024 rows, d = 576, 8,192 latents, k_aux = d / 2 = 288, compute dtype as
``--compute-dtype auto`` picks), once through the dense path and once through the sparse TopK
kernels (``AUXK_DENSE_LATENTS`` set to 0), on the same inputs. The ratio is dense / sparse, measured in the same run; below 1 the dense path is
faster. ``AUXK_DENSE_LATENTS`` in ``interp/dictionary/train.py`` is the padded size up to which the
trainer runs the dense path.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import interleaved, report  # noqa: E402

ROWS, D, LATENTS = 1024, 576, 8192


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dead", default="100,300,700,1000,2000,4000")
    args = parser.parse_args()
    train = importlib.import_module("interp.dictionary.train")
    from interp.dictionary import DictionaryConfig, SparseDictionary

    d = SparseDictionary(DictionaryConfig(d_in=D, n_latents=LATENTS, k=32), seed=0)
    d.compute_dtype = train.compute_dtype("auto")
    z = torch.randn(ROWS, D, generator=torch.Generator().manual_seed(0), requires_grad=True)  # as in training (b_dec)
    dense_limit = train.AUXK_DENSE_LATENTS
    print(f"compute dtype {d.compute_dtype or torch.float32}; the trainer runs dense up to {dense_limit} padded latents")

    def case(dead_ids: torch.Tensor, limit: int):
        def run() -> None:
            train.AUXK_DENSE_LATENTS = limit
            train.auxk_reconstruction(d, z, dead_ids, min(D // 2, len(dead_ids))).pow(2).sum().backward()
            d.zero_grad(set_to_none=True)
            z.grad = None
        return run

    for n in (int(v) for v in args.dead.split(",")):
        dead_ids = torch.randperm(LATENTS, generator=torch.Generator().manual_seed(n))[:n].sort().values
        times = interleaved({"sparse kernels": case(dead_ids, 0), "dense": case(dead_ids, LATENTS)}, repeats=args.repeats)
        report(f"AuxK forward + backward, {n} dead latents", times, "sparse kernels")
    train.AUXK_DENSE_LATENTS = dense_limit


if __name__ == "__main__":
    main()
