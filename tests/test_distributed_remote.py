"""Stores read through fsspec URLs (ranged reads), and the nnsight remote-execution path."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch

from interp.dictionary import TrainConfig, train
from interp.dictionary.io import load_dictionary
from interp.errors import StoreError
from interp.store import ActivationStore, write_arrays
from interp.store import remote


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9_000, 24, generator=g)
    return write_arrays(tmp_path_factory.mktemp("local") / "store", {"acts": x, "other": x[:, :8] * 2}, rows_per_shard=2_000)


@pytest.fixture(scope="module")
def memory_store(local_store):
    """The same files in fsspec's in-memory filesystem: no memory map is possible there."""
    fs = fsspec.filesystem("memory")
    for path in local_store.root.rglob("*"):
        if path.is_file():
            fs.pipe(f"/remote-test/{path.relative_to(local_store.root)}", path.read_bytes())
    yield "memory://remote-test"
    fs.rm("/remote-test", recursive=True)


def test_ranged_reads_return_the_memory_mapped_rows(local_store, memory_store, monkeypatch):
    store = ActivationStore(memory_store)
    assert store.fs is not None and store.n_rows == local_store.n_rows
    requests = []
    real = remote.RangedArray.take
    monkeypatch.setattr(remote.RangedArray, "take", lambda self, rows: requests.append(len(rows)) or real(self, rows))
    assert torch.equal(store.read("acts", slice(1_500, 4_500)), local_store.read("acts", slice(1_500, 4_500)))  # across shards
    rows = np.random.default_rng(1).choice(store.n_rows, 700, replace=False)  # unsorted, every shard
    assert torch.equal(store.read("acts", rows), local_store.read("acts", rows))
    assert np.array_equal(store.rows(rows), local_store.rows(rows))
    assert sum(requests) == 2 * 700  # the gathers went through ranged reads
    for a, b in zip(store.batches(["acts", "other"], 1000, shuffle=True, seed=4), local_store.batches(["acts", "other"], 1000, shuffle=True, seed=4)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert store.verify() == []
    assert torch.equal(ActivationStore(f"file://{local_store.root}").read("acts"), local_store.read("acts"))  # file:// maps


def test_remote_store_problems_are_named(memory_store):
    fs = fsspec.filesystem("memory")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore("memory://nothing-here")
    with pytest.raises(StoreError, match="cannot open"):
        ActivationStore("nosuchprotocol://bucket/store")
    fs.pipe("/damaged/manifest.json", fs.cat_file("/remote-test/manifest.json"))
    for name in ("rows.npy", "acts.npy", "other.npy"):
        fs.pipe(f"/damaged/shards/00000/{name}", fs.cat_file(f"/remote-test/shards/00000/{name}"))
    damaged = ActivationStore("memory://damaged")
    assert any("shard 1" in problem and "missing" in problem for problem in damaged.verify())
    with pytest.raises(StoreError, match="shard 1 .*damaged"):
        damaged.read("acts", slice(0, 3_000))


def test_training_from_a_url_equals_training_from_the_folder(tmp_path, local_store, memory_store):
    settings = dict(model="none", site="acts", k="4", latents=64, tokens=8_192, batch_size=1024, eval_tokens=1000,
                    eval_contexts=0, warmup_steps=2, lr=3e-3, compute_dtype="float32")
    train(TrainConfig(store=str(local_store.root), out=tmp_path / "local", **settings), progress=False)
    train(TrainConfig(store=memory_store, out=tmp_path / "remote", **settings), progress=False)
    a, b = load_dictionary(tmp_path / "local" / "sae-topk-k4-64"), load_dictionary(tmp_path / "remote" / "sae-topk-k4-64")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
