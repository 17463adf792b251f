"""The activation store: parity with the HF modules, crash safety, concurrent writers, shuffling, integrity."""

from __future__ import annotations

import errno
import json
import os
import pickle
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
from interp.store.shuffle import RowPermutation

SITES = "blocks.1.hook_resid_post,blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2)


def config(out, corpus, **kw):
    base = dict(out=out, model="tiny:llama", sites=SITES, corpus=str(corpus), tokens=6000, context_len=32,
                batch_size=8, shard_contexts=32, seed=0)
    return HarvestConfig(**{**base, **kw})


def hf_activations(model, tokens):
    """The stored sites computed independently of interp: plain torch hooks on the HF modules
    (the output of decoder layer 1; the input of layer 0's down projection)."""
    layers = model.module.model.layers
    got = {}

    def keep_output(module, args, output):
        got["blocks.1.hook_resid_post"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    def keep_input(module, args):
        got["blocks.0.mlp.hook_post"] = args[0].detach().clone()

    handles = [layers[1].register_forward_hook(keep_output), layers[0].mlp.down_proj.register_forward_pre_hook(keep_input)]
    try:
        with torch.no_grad():
            model.module(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return got


def test_rows_equal_the_hf_modules_activations_bitwise(tmp_path, corpus_file, model):
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
        expected = hf_activations(model, tokens)
        for site in SITES.split(","):
            assert torch.equal(store.read(site, np.array([index]))[0], expected[site][context - batch_start, position]), (site, index)


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


def cli_config(out, corpus, **kw):
    """The settings of ``harvest_cli`` (11 shards of 64 contexts, 8 batches each)."""
    return config(out, corpus, tokens=20_000, shard_contexts=64, **kw)


def harvest_cli(out, corpus, *, fault, **popen):
    """The same harvest as ``cli_config`` in a child process with INTERP_FAULT=``fault`` (interp/faults.py)."""
    command = [sys.executable, "-m", "interp", "harvest", "--model", "tiny:llama", "--sites", SITES, "--tokens", "20k",
               "--context-len", "32", "--batch-size", "8", "--shard-contexts", "64", "--corpus", str(corpus), "--out", str(out)]
    return subprocess.Popen(command, env={**os.environ, "INTERP_FAULT": fault}, stdout=subprocess.DEVNULL,
                            stderr=popen.pop("stderr", subprocess.DEVNULL), **popen)


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, corpus_file, model):
    return harvest(cli_config(tmp_path_factory.mktemp("reference") / "store", corpus_file), model=model, progress=False)


@pytest.mark.parametrize("fault, leftover", [
    ("harvest.batch#28", None),                  # mid-shard: inside shard 3's forward passes (8 batches per shard)
    ("harvest.shard-written#3", ".00002.tmp-"),  # shard 2's files written and flushed, not yet renamed
    ("harvest.shard-renamed#3", "00002"),        # shard 2 renamed into place, not yet in the manifest
])
def test_sigkill_at_any_point_then_resume_reproduces_an_uninterrupted_run(tmp_path, corpus_file, model, reference_store,
                                                                          fault, leftover):
    killed = tmp_path / "killed"
    assert harvest_cli(killed, corpus_file, fault=fault).wait(timeout=300) == -signal.SIGKILL
    state = json.loads((killed / "manifest.json").read_text())
    assert not state["complete"] and [s["index"] for s in state["shards"]] == [0, 1] + ([2] if leftover is None else [])
    if leftover:  # what the kill left behind is really there, and it is not a recorded shard
        assert [p.name for p in (killed / "shards").iterdir() if p.name.startswith(leftover)]
    assert ActivationStore(killed).verify() == []  # what is recorded is whole

    resumed = harvest(cli_config(killed, corpus_file), model=model, progress=False)
    assert resumed.complete and resumed.n_rows == reference_store.n_rows
    assert np.array_equal(resumed.rows(), reference_store.rows())
    for site in SITES.split(","):
        assert torch.equal(resumed.read(site), reference_store.read(site))
    assert sorted(p.name for p in (killed / "shards").iterdir()) == [f"{i:05d}" for i in range(len(reference_store.shards))]


def test_second_writer_waits_or_names_the_holder_and_readers_are_never_blocked(tmp_path, corpus_file, model, reference_store):
    """Real processes on one store: the first pauses (deterministically, INTERP_FAULT hold) with
    shard 2 written to a temporary folder; a second writer told not to wait (this process) fails
    naming the first one's pid; a reader reads the complete shards meanwhile; a third writer (a
    child process) waits for the first; the first writer's temporary shard survives all of it,
    and the store ends equal to an undisturbed harvest."""
    from interp.errors import LockedError

    out, held = tmp_path / "store", tmp_path / "held"
    first = harvest_cli(out, corpus_file, fault=f"harvest.shard-written#3#hold:{held}")
    deadline = time.time() + 300
    while not held.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert held.exists(), "the first writer never reached its hold point"
    temporary = [p for p in (out / "shards").iterdir() if p.name.startswith(".00002.tmp-")]
    assert len(temporary) == 1

    with pytest.raises(LockedError, match=f"being written by pid {first.pid} "):
        harvest(cli_config(out, corpus_file, wait=False), model=model, progress=False)
    reader = ActivationStore(out)  # complete shards stay readable while the writer holds the lock
    site = SITES.split(",")[0]
    assert reader.n_rows == 2 * 64 * 31 and torch.equal(reader.read(site), reference_store.read(site, slice(0, reader.n_rows)))

    log = tmp_path / "third.log"
    with open(log, "w") as stderr:
        third = harvest_cli(out, corpus_file, fault="none#1", stderr=stderr)
        while f"waiting for pid {first.pid}" not in log.read_text() and third.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert f"waiting for pid {first.pid}" in log.read_text(), log.read_text()
        assert temporary[0].exists()  # the waiting writer did not clean up the live writer's shard
        held.unlink()  # let the first writer go on
        assert first.wait(timeout=300) == 0
        assert third.wait(timeout=300) == 0, log.read_text()
    store = ActivationStore(out)
    assert store.complete and store.verify() == [] and not temporary[0].exists()
    for name in SITES.split(","):
        assert torch.equal(store.read(name), reference_store.read(name))


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


def test_row_permutation_is_a_bijection_on_ten_million_rows():
    n = 10_000_000
    permutation = RowPermutation(n, [0, 0])
    rows = np.concatenate([permutation[start : start + 2**21] for start in range(0, n, 2**21)])
    assert len(rows) == n and rows.min() == 0 and rows.max() == n - 1
    assert np.bincount(rows, minlength=n).max() == 1  # n rows, none twice: each exactly once
    # and it shuffles: a batch spreads over the whole range, positions and rows are uncorrelated
    first = rows[:4096]
    assert np.abs(np.bincount(first * 10 // n, minlength=10) - 409.6).max() < 100  # about 5 sigma
    assert abs(np.corrcoef(np.arange(2**20), rows[: 2**20])[0, 1]) < 0.01
    other = RowPermutation(n, [0, 1])[:4096]
    assert len(np.intersect1d(first, other)) < 20  # another epoch: an unrelated order (about 1.7 shared by chance)


def test_tabulated_round_functions_give_the_hashed_permutation(monkeypatch):
    """Up to TABLE_LIMIT the rounds look F up in tables; above it they hash. Both must give the same
    order (an epoch's order must not depend on the store's size class or the code path)."""
    import interp.store.shuffle as shuffle

    for n in (1, 7, 1000, 465_536, 10**9):
        positions = np.arange(min(n, 50_000))
        tabulated = RowPermutation(n, [3, 1])
        assert tabulated.tables is not None
        monkeypatch.setattr(shuffle, "TABLE_LIMIT", 0)
        hashed = RowPermutation(n, [3, 1])
        monkeypatch.undo()
        assert hashed.tables is None
        assert np.array_equal(tabulated[positions], hashed[positions]), n
    with pytest.raises(IndexError):
        RowPermutation(10, [0])[np.array([-1])]


def test_row_permutation_steps_like_a_random_order():
    """Consecutive positions must not sit a near-constant number of rows apart (a nearly linear map
    passes the spread and correlation checks above but puts neighbouring tokens into one batch).
    The same bounds are checked on numpy's random permutation, so they are known to be fair."""
    n = 400_000
    for name, rows in (("interp", RowPermutation(n, [0, 0])[:200_000]), ("numpy", np.random.default_rng(0).permutation(n)[:200_000])):
        distinct = len(np.unique(np.diff(rows)))
        batches = np.sort(rows[: 1024 * 50].reshape(50, 1024), axis=1)
        close = float((np.diff(batches, axis=1) < 20).mean())  # neighbours within 20 rows inside a batch
        assert distinct > 150_000, (name, distinct)  # random: about 190k distinct steps among 200k
        assert close < 0.07, (name, close)  # random: about 5%


def test_starting_an_epoch_over_a_billion_virtual_rows_is_cheap_and_reads_nothing():
    import tracemalloc

    from interp.store.read import Batches

    n = 10**9
    loader = Batches(object(), ["acts"], 4096, shuffle=True, seed=3, dtype=None, drop_last=False, single=True,
                     rank=0, world_size=1, start=0, stop=n)  # no store behind it: any read would fail
    tracemalloc.start()
    try:
        began = time.perf_counter()
        loader.load_state_dict({"epoch": 7, "batch": 0, "seed": 3, "shuffle": True, "batch_size": 4096})
        rows = loader.rows_of(0)
        elapsed = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 100e6, (elapsed, peak)
    assert len(np.unique(rows)) == 4096 and rows.min() >= 0 and rows.max() < n and (np.diff(rows) > 0).all()
    assert np.array_equal(rows, np.sort(RowPermutation(n, [3, 7])[:4096]))


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


def _mappings_under(folder) -> list[str]:
    """This process's memory mappings of files under ``folder``."""
    with open("/proc/self/maps") as f:
        return [line for line in f if str(folder) in line]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unmapped_reads_match_the_data_and_map_nothing(tmp_path, dtype):
    """keep_pages=False (the trainer's reader) copies rows with pread: the rows written, in the
    caller's order, across shards, and not one mapping of the store's files (a memory map would map
    a whole cached folio, up to 2 MB, around every scattered row it reads)."""
    from interp.store.write import write_arrays

    data = torch.randn(10_000, 96)
    kept = write_arrays(tmp_path / "s", {"x": data, "y": -data}, rows_per_shard=4096, dtype=dtype)
    expected = data.to(getattr(torch, dtype))
    unmapped = ActivationStore(tmp_path / "s", keep_pages=False)
    picks = np.random.default_rng(0).integers(0, 10_000, 3_000)  # unsorted, repeated, all three shards
    runs = np.concatenate([np.arange(4090, 4110), [0, 1, 2, 9999]])  # consecutive runs across a shard boundary
    for rows in (picks, runs, picks[:1], np.array([], dtype=np.int64)):
        assert torch.equal(unmapped.read("x", rows, dtype=None), expected[torch.from_numpy(rows)])
    assert torch.equal(unmapped.read("y", slice(50, 9000), dtype=None), -expected[50:9000])
    assert torch.equal(unmapped.read("x", dtype=None), expected)
    assert np.array_equal(unmapped.rows(picks)[:, :2], np.stack([picks, np.zeros_like(picks)], 1))  # context = row
    batch = next(iter(unmapped.batches(["x", "y"], 512, shuffle=True, seed=3, dtype=None)))
    assert torch.equal(batch["y"], -batch["x"])
    copied = pickle.loads(pickle.dumps(unmapped))  # opens its own files (never a shared descriptor)
    assert torch.equal(copied.read("x", picks, dtype=None), expected[torch.from_numpy(picks)])
    assert _mappings_under(tmp_path / "s") == []
    kept.read("x", picks)  # the check itself: the memory-mapped reader does map the store
    assert _mappings_under(tmp_path / "s") != []


def test_a_shard_cut_short_after_opening_is_a_clear_error(tmp_path):
    from interp.store.write import write_arrays

    write_arrays(tmp_path / "s", {"x": torch.randn(1000, 16)})
    store = ActivationStore(tmp_path / "s", keep_pages=False)
    assert store.read("x", slice(0, 10)).shape == (10, 16)  # opened, sizes checked
    shard = next((tmp_path / "s").rglob("x.npy"))
    os.truncate(shard, shard.stat().st_size - 16 * 4 * 10)
    assert store.read("x", slice(0, 10)).shape == (10, 16)  # rows still there
    with pytest.raises(StoreError, match="ended early"):
        store.read("x", np.array([5, 995]))


def test_several_sites_stay_aligned_and_ranks_split(tmp_path, corpus_file, model):
    store = harvest(config(tmp_path / "s", corpus_file), model=model, progress=False)
    sites = SITES.split(",")
    batch = next(iter(store.batches(sites, 64, shuffle=True, seed=1)))
    rows = np.sort(RowPermutation(store.n_rows, [1, 0])[:64])
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
