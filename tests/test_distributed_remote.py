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


# ------------------------------------------------------------------ nnsight remote execution


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from interp.models import tiny_model

    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.module.save_pretrained(folder)
    return model, folder


def test_remote_model_reads_its_sites_inside_a_remote_trace(tiny_folder, monkeypatch):
    """No NDIF server is reachable here: the request that would go out with remote=True is run
    locally instead (same weights, dispatched), and compared with the HF modules' own tensors."""
    import nnsight

    from interp.models.remote import RemoteModel

    model, folder = tiny_folder
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)  # restored afterwards: RemoteModel sets it
    remote_model = RemoteModel(str(folder), api_key="test-key", tokenizer=model.tokenizer, dispatch=True)
    assert nnsight.CONFIG.API.APIKEY == "test-key"
    flags = []
    real_trace = type(remote_model.lm).trace

    def trace(self, *args, **kwargs):
        flags.append(kwargs.get("remote"))
        return real_trace(self, *args, **{**kwargs, "remote": False})

    monkeypatch.setattr(type(remote_model.lm), "trace", trace)
    cache = remote_model.run_with_cache(["stone river light"], ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.1.hook_attn_out"])
    assert flags == [True]

    expected, layers = {}, model.module.model.layers
    handles = [
        layers[1].register_forward_hook(lambda m, a, o: expected.__setitem__("blocks.1.hook_resid_post", o[0] if isinstance(o, tuple) else o)),
        layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: expected.__setitem__("blocks.0.mlp.hook_post", a[0])),
        layers[1].self_attn.register_forward_hook(lambda m, a, o: expected.__setitem__("blocks.1.hook_attn_out", o[0])),
    ]
    try:
        with torch.no_grad():
            model.module(input_ids=torch.tensor([model.tokenizer("stone river light")["input_ids"]]))
    finally:
        for handle in handles:
            handle.remove()
    assert set(cache) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(cache[name], value, rtol=0, atol=1e-6, msg=name)


def test_remote_needs_an_api_key_and_a_remote_site(tiny_folder, monkeypatch):
    import nnsight
    from typer.testing import CliRunner

    from interp.cli import app
    from interp.errors import InputError, UnknownSiteError
    from interp.models.remote import RemoteModel

    model, folder = tiny_folder
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(InputError, match="NDIF_API_KEY"):
        RemoteModel(str(folder), tokenizer=model.tokenizer)
    result = CliRunner().invoke(app, ["cache", "--model", "some-org/some-405b-model", "--remote"])
    assert result.exit_code == 2 and "NDIF API key" in result.output
    remote_model = RemoteModel(str(folder), api_key="test-key", tokenizer=model.tokenizer)  # meta weights: nothing loaded
    with pytest.raises(UnknownSiteError, match="norm sites"):
        remote_model.module_of("blocks.0.ln2.hook_normalized")
