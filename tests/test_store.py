"""The activation store: parity with run_with_cache, crash safety, shuffling, integrity."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from interp.errors import InputError, StoreError
from interp.models import tiny_model
from interp.store import ActivationStore, HarvestConfig, harvest

SITES = "blocks.1.hook_resid_post,blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A few hundred kB of varied text (byte-level tokens for the tiny models)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "quiet", "seven", "north", "ember", "tide"]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(rng.choice(words, size=60_000)))
    return path


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2)


def config(out, corpus, **kw):
    base = dict(out=out, model="tiny:llama", sites=SITES, corpus=str(corpus), tokens=6000, context_len=32,
                batch_size=8, shard_contexts=32, seed=0)
    return HarvestConfig(**{**base, **kw})


def test_rows_equal_run_with_cache_bitwise(tmp_path, corpus_file, model):
    store = harvest(config(tmp_path / "s", corpus_file), model=model, progress=False)
    assert store.complete and store.n_rows == 194 * 31  # ceil(6000 / 31) contexts, BOS excluded
    rows = store.rows()
    assert (rows[:, 1] >= 1).all()  # position 0 (BOS) left out
    for index in [0, 17, 1000, store.n_rows - 1]:
        context, position = int(rows[index, 0]), int(rows[index, 1])
        batch_start = (context // 8) * 8  # the forward pass that produced it
        batch_stop = min(batch_start + 8, store.manifest["contexts"]["count"])
        tokens = torch.from_numpy(np.stack([store_tokens(store, c) for c in range(batch_start, batch_stop)])).long()
        assert int(tokens[context - batch_start, position]) == int(rows[index, 2])
        cache = model.run_with_cache(tokens, SITES.split(","))
        for site in SITES.split(","):
            expected = cache[site][context - batch_start, position]
            assert torch.equal(store.read(site, np.array([index]))[0], expected), (site, index)


def store_tokens(store, context):
    """The token ids of one context, rebuilt from the row table (BOS from the tokenizer)."""
    rows = store.rows()
    mine = rows[rows[:, 0] == context]
    return np.concatenate([[0], mine[:, 2]])  # tiny tokenizer: BOS id 0


def test_storage_dtypes(tmp_path, corpus_file, model):
    full = harvest(config(tmp_path / "f32", corpus_file, tokens=500), model=model, progress=False)
    for dtype, torch_dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        store = harvest(config(tmp_path / dtype, corpus_file, tokens=500, dtype=dtype), model=model, progress=False)
        site = "blocks.1.hook_resid_post"
        assert torch.equal(store.read(site, dtype=None), full.read(site).to(torch_dtype))
        assert store.read(site).dtype == torch.float32


def test_kill_and_resume_reproduces_an_uninterrupted_run(tmp_path, corpus_file):
    args = ["--model", "tiny:llama", "--sites", SITES, "--corpus", str(corpus_file), "--tokens", "60k",
            "--context-len", "32", "--batch-size", "8", "--shard-contexts", "64"]
    cli = [sys.executable, "-m", "interp", "harvest"]
    reference = tmp_path / "reference"
    subprocess.run([*cli, *args, "--out", str(reference)], check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cli, *args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = killed / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists():
            try:
                if len(json.loads(manifest.read_text())["shards"]) >= 3:
                    break
            except ValueError:
                pass
        time.sleep(0.005)
    time.sleep(0.03)  # now inside a later shard's forward passes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    n_shards = len(json.loads((reference / "manifest.json").read_text())["shards"])
    assert not state["complete"] and 3 <= len(state["shards"]) < n_shards, "the kill must land mid-harvest"
    partial = ActivationStore(killed)
    assert partial.verify() == []  # what is recorded is whole
    # Leftovers a kill can leave: a temp dir being written, a shard renamed but not recorded.
    (killed / "shards" / ".00099.tmp-1").mkdir()
    (killed / "shards" / "00098").mkdir()

    subprocess.run([*cli, *args, "--out", str(killed)], check=True, capture_output=True)
    resumed, full = ActivationStore(killed), ActivationStore(reference)
    assert resumed.complete and resumed.n_rows == full.n_rows
    assert np.array_equal(resumed.rows(), full.rows())
    for site in SITES.split(","):
        assert torch.equal(resumed.read(site), full.read(site))
    assert sorted(p.name for p in (killed / "shards").iterdir()) == [f"{i:05d}" for i in range(n_shards)]


def test_shuffled_epochs_visit_every_row_once_and_resume_exactly(tmp_path, corpus_file, model):
    store = harvest(config(tmp_path / "s", corpus_file), model=model, progress=False)
    site = "blocks.1.hook_resid_post"
    loader = store.batches(site, 100, shuffle=True, seed=5)
    seen = []
    for number, batch in enumerate(loader):
        rows = loader.rows_of(number)
        assert torch.equal(batch, store.read(site, rows))
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(store.n_rows))  # every row exactly once
    assert loader.epoch == 1 and seen != sorted(seen)
    epoch2 = [b.clone() for b in loader]
    assert not all(torch.equal(a, b) for a, b in zip(epoch2, store.batches(site, 100, shuffle=True, seed=5)))

    first = store.batches(site, 100, shuffle=True, seed=5)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    saved = first.state_dict()
    rest = list(it)
    again = store.batches(site, 100, shuffle=True, seed=5)
    again.load_state_dict(saved)
    resumed = list(again)
    assert len(resumed) == len(rest) and all(torch.equal(a, b) for a, b in zip(resumed, rest))
    assert len(head) + len(rest) == len(first)
    with pytest.raises(InputError, match="seed"):
        store.batches(site, 100, shuffle=True, seed=6).load_state_dict(saved)


def test_reads_in_any_index_order(tmp_path, corpus_file, model):
    store = harvest(config(tmp_path / "s", corpus_file, tokens=3000), model=model, progress=False)
    site = "blocks.1.hook_resid_post"
    everything = store.read(site)
    picks = np.array([store.n_rows - 1, 3, 1500, 3, 0])  # unsorted, repeated, across shards
    assert torch.equal(store.read(site, picks), everything[torch.from_numpy(picks)])
    assert np.array_equal(store.rows(picks), store.rows()[picks])
    assert torch.equal(store.read(site, slice(10, 2000)), everything[10:2000])
    with pytest.raises(InputError, match="out of range"):
        store.read(site, np.array([store.n_rows]))


def test_several_sites_stay_aligned_and_ranks_split(tmp_path, corpus_file, model):
    store = harvest(config(tmp_path / "s", corpus_file), model=model, progress=False)
    sites = SITES.split(",")
    batch = next(iter(store.batches(sites, 64, shuffle=True, seed=1)))
    rows = np.sort(np.random.default_rng([1, 0]).permutation(store.n_rows)[:64])
    for site in sites:
        assert torch.equal(batch[site], store.read(site, rows))
    ranks = [list(store.batches(sites[0], 50, rank=r, world_size=2)) for r in range(2)]
    alternating = [ranks[i % 2][i // 2] for i in range(len(ranks[0]) + len(ranks[1]))]  # batch i went to rank i % 2
    assert torch.equal(torch.cat(alternating), store.read(sites[0]))


def test_mismatched_store_is_refused(tmp_path, corpus_file, model):
    out = tmp_path / "s"
    harvest(config(out, corpus_file, tokens=300), model=model, progress=False)
    with pytest.raises(InputError, match="seed|contexts_digest"):
        harvest(config(out, corpus_file, tokens=300, seed=1), model=model, progress=False)
    other = tiny_model("llama", n_layers=2, seed=1)
    with pytest.raises(InputError, match="model_fingerprint"):
        harvest(config(out, corpus_file, tokens=300), model=other, progress=False)
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="non-empty folder"):
        harvest(config(tmp_path / "notastore", corpus_file), model=model, progress=False)
    assert (tmp_path / "notastore" / "keep.txt").read_text() == "precious"


def test_bad_sites_fail_before_any_work(tmp_path, corpus_file, model):
    from interp.errors import UnknownSiteError

    with pytest.raises(UnknownSiteError, match="closest"):
        harvest(config(tmp_path / "s", corpus_file, sites="blocks.1.hook_resid_pots"), model=model, progress=False)
    with pytest.raises(InputError, match="no fixed-size vector"):
        harvest(config(tmp_path / "s2", corpus_file, sites="blocks.1.attn.hook_pattern"), model=model, progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s2").exists()
    store = harvest(config(tmp_path / "s3", corpus_file, tokens=300), model=model, progress=False)
    with pytest.raises(InputError, match="not in the store.*closest"):
        store.batches("blocks.1.hook_resid_pre", 10)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_full_or_read_only_destination_keeps_written_rows(tmp_path, corpus_file, model, monkeypatch, code):
    import interp.store.write as write_module

    reference = harvest(config(tmp_path / "reference", corpus_file), model=model, progress=False)
    out = tmp_path / "s"
    harvest(config(out, corpus_file), model=model, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())  # as if an earlier run stopped after 2 shards
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    (out / "manifest.json").write_text(json.dumps(manifest))

    real_save, calls = np.save, {"n": 0}

    def failing_save(handle, array, allow_pickle=False):
        calls["n"] += 1
        if calls["n"] > 1:  # the disk fills (or turns read-only) partway through a shard
            raise OSError(code, os.strerror(code))
        return real_save(handle, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(write_module.np, "save", failing_save)
    with pytest.raises(InputError, match=f"{os.strerror(code)}.*2 complete shards.*intact.*resume"):
        harvest(config(out, corpus_file), model=model, progress=False)
    kept = ActivationStore(out)
    assert kept.n_rows == 2 * 32 * 31 and kept.verify() == []
    site = "blocks.1.hook_resid_post"
    assert torch.equal(kept.read(site), reference.read(site, slice(0, kept.n_rows)))
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(write_module.np, "save", real_save)
    resumed = harvest(config(out, corpus_file), model=model, progress=False)  # once fixed, it resumes
    assert torch.equal(resumed.read(site), reference.read(site))


def test_destination_checks(tmp_path, corpus_file, model, monkeypatch):
    import interp.store.write as write_module

    monkeypatch.setattr(write_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(InputError, match="needs .* GB .* free"):
        harvest(config(tmp_path / "s", corpus_file), model=model, progress=False)
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InputError, match="cannot write"):
            harvest(config(locked / "s", corpus_file), model=model, progress=False)


def test_damaged_shards_are_reported_and_the_rest_stays_readable(tmp_path, corpus_file, model):
    from typer.testing import CliRunner

    from interp.cli import app

    out = tmp_path / "s"
    harvest(config(out, corpus_file), model=model, progress=False)
    site_file = "blocks.1.hook_resid_post.npy"
    flipped = out / "shards" / "00001" / site_file
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = out / "shards" / "00003" / site_file
    truncated.write_bytes(truncated.read_bytes()[:1000])
    store = ActivationStore(out)
    problems = store.verify()
    assert any("shard 1" in p and "checksum" in p for p in problems)
    assert any("shard 3" in p and "bytes" in p for p in problems)
    result = CliRunner().invoke(app, ["store", "verify", str(out)])
    assert result.exit_code == 1 and "shard 3" in result.output
    with pytest.raises(StoreError, match="shard 3 .* damaged.*verify"):
        store.read("blocks.1.hook_resid_post")
    first_two = slice(0, int(store.offsets[2]))
    assert store.read("blocks.1.hook_resid_post", first_two).shape[0] == int(store.offsets[2])
    info = CliRunner().invoke(app, ["store", "info", str(out)])
    assert info.exit_code == 0 and "complete" in info.output and "tiny-llama" in info.output
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path)
