"""Scale-out with torch.distributed: real 2-process gloo jobs launched by torchrun.

Each job is compared with the single-process result computed in this process (one thread, as the
torchrun workers use): the 2-rank harvest must write the same store byte for byte, 2-rank
data-parallel training must reach the same parameters, a dictionary-parallel sweep the same
dictionaries, and a job whose rank 1 is killed must resume to the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from interp.dictionary import TrainConfig, train
from interp.dictionary.io import load_dictionary
from interp.store import ActivationStore, HarvestConfig, harvest, write_arrays

SITES = "blocks.1.hook_resid_post,blocks.0.mlp.hook_post"


def torchrun(args: list[str], *, fault: str = "", fault_rank: int = 1, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m interp ARGS`` (one thread per worker)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env.update(INTERP_FAULT=fault, INTERP_FAULT_RANK=str(fault_rank))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "interp", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def one_thread():
    """The single-process references run with one thread, like every torchrun worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- harvest


def harvest_args(out: Path, corpus: Path) -> list[str]:
    return ["harvest", "--model", "tiny:llama", "--sites", SITES, "--tokens", "6000", "--context-len", "32",
            "--batch-size", "8", "--shard-contexts", "32", "--corpus", str(corpus), "--out", str(out)]


@pytest.fixture(scope="module")
def one_rank_store(tmp_path_factory, corpus_file):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = HarvestConfig(out=tmp_path_factory.mktemp("one") / "store", model="tiny:llama", sites=SITES, corpus=str(corpus_file),
                               tokens=6000, context_len=32, batch_size=8, shard_contexts=32)
        return harvest(config, progress=False)
    finally:
        torch.set_num_threads(before)


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    """Same manifest (but its creation time) and the same bytes in every shard file."""
    ma, mb = (dict(s.manifest, created=None, config=dict(s.manifest["config"], out=None)) for s in (a, b))
    assert ma == mb
    assert a.complete and len(a.shards) == 7
    for record in a.shards:
        for filename in record["files"]:
            folder = f"shards/{record['index']:05d}/{filename}"
            assert (a.root / folder).read_bytes() == (b.root / folder).read_bytes(), folder


def test_two_rank_harvest_writes_the_one_rank_store_byte_for_byte(tmp_path, corpus_file, one_rank_store):
    done = torchrun(harvest_args(tmp_path / "store", corpus_file))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("state   complete") == 1  # one report, from rank 0
    assert_same_store(one_rank_store, ActivationStore(tmp_path / "store"))


def test_killed_rank_harvest_resumes_with_the_same_ranks(tmp_path, corpus_file, one_rank_store):
    out = tmp_path / "store"
    # rank 1 (shards 1, 3, 5) dies after renaming its second shard into place, before recording it
    killed = torchrun(harvest_args(out, corpus_file), fault="harvest.shard-renamed#2")
    assert killed.returncode != 0
    assert (out / "shards" / "00003").is_dir()  # rank 1's unrecorded shard
    partial = ActivationStore(out)
    recorded = [s["index"] for s in partial.manifest["shards"]]
    assert not partial.complete and 1 in recorded and 3 not in recorded
    assert [s["index"] for s in partial.shards] == list(range(len(partial.shards)))  # readers see no gap
    resumed = torchrun(harvest_args(out, corpus_file))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_store(one_rank_store, ActivationStore(out))


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def acts_store(tmp_path_factory):
    """Synthetic sparse activations: sums of 3 of 64 unit directions in 32 dimensions."""
    g = torch.Generator().manual_seed(5)
    truth = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    which = torch.rand(12_000, 64, generator=g).argsort(-1)[:, :3]
    x = torch.einsum("na,nad->nd", torch.rand(12_000, 3, generator=g) + 0.5, truth[which])
    return write_arrays(tmp_path_factory.mktemp("acts") / "store", {"acts": x})


def test_row_split_gives_each_rank_a_disjoint_part_of_every_batch(acts_store):
    whole = acts_store.batches("acts", 1000, shuffle=True, seed=3, rows=(0, 10_000), drop_last=True)
    parts = [acts_store.batches("acts", 1000, shuffle=True, seed=3, rows=(0, 10_000), drop_last=True, rank=r, world_size=3,
                                split="rows") for r in range(3)]
    assert [len(p) for p in parts] == [len(whole)] * 3
    for batch, *pieces in zip(whole, *parts):
        assert [len(p) for p in pieces] == [334, 333, 333]
        assert torch.equal(torch.cat(pieces), batch)
    seen = np.concatenate([p.rows_of(i) for i in range(len(whole)) for p in parts])
    assert np.array_equal(np.sort(seen), np.arange(10_000))  # one epoch: every row once, on one rank


SETTINGS = dict(k="3", latents=128, tokens=16_384, batch_size=1024, eval_tokens=2048, checkpoint_every=4, warmup_steps=5,
                lr=3e-3, auxk_dead_tokens=2048, compute_dtype="float32")


def train_args(store: ActivationStore, out: Path, **changes) -> list[str]:
    settings = {**SETTINGS, **changes}
    args = ["train-sae", "--model", "none", "--store", str(store.root), "--site", "acts", "--eval-contexts", "0", "--out", str(out)]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def train_here(store: ActivationStore, out: Path, **changes) -> dict:
    return train(TrainConfig(model="none", store=store.root, site="acts", eval_contexts=0, out=out, **{**SETTINGS, **changes}),
                 progress=False)


def assert_same_parameters(a_run: Path, b_run: Path, name: str, *, atol: float) -> None:
    a, b = load_dictionary(a_run / name), load_dictionary(b_run / name)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, atol=atol, rtol=0, msg=lambda m: f"{name}.{key}: {m}")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, acts_store):
    """A 2-rank data-parallel TopK run (AuxK active), uninterrupted."""
    out = tmp_path_factory.mktemp("two") / "run"
    done = torchrun(train_args(acts_store, out, parallel="data"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_two_rank_data_parallel_training_equals_one_rank_with_the_same_global_batch(tmp_path, acts_store, one_thread,
                                                                                    two_rank_run, architecture):
    single = train_here(acts_store, tmp_path / "one", architecture=architecture)
    two = two_rank_run
    if architecture != "topk":
        two = tmp_path / "two"
        done = torchrun(train_args(acts_store, two, architecture=architecture, parallel="data"))
        assert done.returncode == 0, done.stderr[-3000:]
    name = next(iter(single))
    history = json.loads((tmp_path / "one" / "history.json").read_text())
    assert max(entry[name]["dead_auxk"] for entry in history) > 0  # AuxK ran: the dead-latent statistics were reduced
    # float32 sums in another order, then 16 Adam steps: equal to rounding, far below what one skipped step changes
    assert_same_parameters(tmp_path / "one", two, name, atol=2e-5)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics[name]["fvu"] == pytest.approx(single[name]["fvu"], abs=1e-5)
    assert json.loads((two / "config.json").read_text())["resolved"]["world_size"] == 2


def test_data_parallel_ranks_share_the_massive_activation_rate(tmp_path, acts_store, one_thread):
    """With the rate left to the rule on a store with massive rows, every rank trains at the lowered rate (the
    outcome only: it would pass too if every rank read the rows itself rather than taking rank 0's result)."""
    x = acts_store.read("acts", slice(0, acts_store.n_rows)).clone()
    x[torch.arange(0, 9_000, 150)] = 400 * torch.eye(32)[3]  # 60 rows far above 10x the median norm: most of the variance
    store = write_arrays(tmp_path / "massive", {"acts": x})
    out = tmp_path / "run"
    done = torchrun(train_args(store, out, parallel="data", lr=0, latents=512, checkpoint_every=100))
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["lr"] == pytest.approx(4.5e-3 * 0.5, rel=1e-9)  # the capped rule for 512 latents on 16 steps, x 0.5
    assert resolved["lr_candidates"] == [pytest.approx(4.5e-3 * 0.5, rel=1e-9), pytest.approx(4.5e-3, rel=1e-9)]  # and twice it
    assert "massive activations" in resolved["rule"]["lr"] and resolved["world_size"] == 2
    metrics = next(iter(json.loads((out / "metrics.json").read_text()).values()))
    assert len(metrics["lr_selection"]) == 2
    # both ranks applied it: the two-rank run's kept dictionary equals one process at its rate (a rank at another rate would not)
    single = train_here(store, tmp_path / "one", lr=metrics["lr"], latents=512, checkpoint_every=100)
    name = next(iter(single))
    assert_same_parameters(tmp_path / "one", out, name, atol=2e-5)


def test_killed_rank_resumes_to_the_uninterrupted_data_parallel_run(tmp_path, acts_store, two_rank_run):
    out = tmp_path / "run"
    killed = torchrun(train_args(acts_store, out, parallel="data"), fault="train.step#7")  # checkpoints at 4, 8, ...
    assert killed.returncode != 0
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4
    again = torchrun(train_args(acts_store, out, parallel="data"))  # without --resume: refused on both ranks, none hangs
    assert again.returncode != 0 and "already holds a run" in again.stderr
    resumed = torchrun(train_args(acts_store, out, parallel="data") + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same 2-rank arithmetic as the uninterrupted run: equal bit for bit
    assert_same_parameters(two_rank_run, out, "sae-topk-k3-128", atol=0)
    assert json.loads((two_rank_run / "history.json").read_text()) == json.loads((out / "history.json").read_text())


def test_dictionary_parallel_sweep_killed_and_resumed_equals_the_one_process_sweep(tmp_path, acts_store, one_thread):
    single = train_here(acts_store, tmp_path / "one", k="3,8")
    out = tmp_path / "two"
    killed = torchrun(train_args(acts_store, out, k="3,8"), fault="train.step#7")  # auto: one dictionary per rank
    assert killed.returncode != 0
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4
    resumed = torchrun(train_args(acts_store, out, k="3,8") + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["resolved"]["parallel"] == "dictionaries"
    for name in single:  # each rank trains its dictionary on the whole of every batch: the same arithmetic
        assert_same_parameters(tmp_path / "one", out, name, atol=0)
    assert json.loads((tmp_path / "one" / "history.json").read_text()) == json.loads((out / "history.json").read_text())
