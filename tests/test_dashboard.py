"""The feature dashboard: the data embedded in the page against a brute-force encoding, the
``interp dashboard`` command, and the page in a real headless Chromium (search, pagination,
highlighted contexts, no console errors, a screenshot)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from interp.cli import app
from interp.dictionary import DictionaryConfig, SparseDictionary
from interp.dictionary.features import DictionaryFeatures
from interp.models.tiny import byte_tokenizer
from interp.store import HarvestConfig, harvest
from interp.viz import build_dashboard, write_page
from interp.viz.browser import browser_problem, headless_chromium

SITE = "blocks.1.hook_resid_post"
WORDS = ["north", "south", "east", "west", "rain", "snow", "wind", "<b>", "tab\tend"]


@pytest.fixture(scope="module")
def tiny():
    from interp.models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny):
    corpus = tmp_path_factory.mktemp("c") / "text.txt"
    corpus.write_text(" ".join(np.random.default_rng(1).choice(WORDS, 20_000)))
    return harvest(HarvestConfig(out=tmp_path_factory.mktemp("s") / "store", model="tiny:llama", sites=SITE, corpus=str(corpus),
                                 tokens=4000, context_len=32, batch_size=8, shard_contexts=64), model=tiny, progress=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory, store, tiny):
    d = SparseDictionary(DictionaryConfig(d_in=64, n_latents=96, k=4, input_site=SITE, model="tiny:llama"), seed=3)
    path = build_dashboard(DictionaryFeatures(d, name="tiny-sae"), store, tmp_path_factory.mktemp("d") / "tiny-sae.html",
                           model=tiny, n=6, left=5, right=2, progress=False)
    return path, d


def embedded_data(path) -> dict:
    text = path.read_text()
    payload = re.search(r'<script type="application/json" id="interp-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(payload)


def array(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def test_page_data_matches_a_dense_encoding(page, store, tiny):
    path, d = page
    data = embedded_data(path)
    with torch.no_grad():
        dense = d.encode(store.read(SITE)).to_dense(96).numpy()
    np.testing.assert_allclose(array(data["density"], "<f4"), (dense > 0).mean(0), rtol=1e-5)
    np.testing.assert_allclose(array(data["max"], "<f4"), dense.max(0), rtol=1e-5)
    vocab, tokens = data["vocab"], array(data["tokens"], "<u2")
    tokenizer = byte_tokenizer()
    assert [vocab[t] for t in tokens[:50]] == [tokenizer.decode([int(t)]) for t in store.rows()[:50, 2]]
    ex_off, ex_rows, ex_vals = array(data["ex_offsets"], "<i4"), array(data["ex_rows"], "<i4"), array(data["ex_values"], "<f4")
    win_off, win_rows, win_vals = array(data["win_offsets"], "<i4"), array(data["win_rows"], "<i4"), array(data["win_values"], "<f4")
    contexts = store.rows()[:, 0]
    for latent in range(96):
        rows = ex_rows[ex_off[latent] : ex_off[latent + 1]]
        np.testing.assert_allclose(ex_vals[ex_off[latent] : ex_off[latent + 1]], np.sort(dense[:, latent])[::-1][: len(rows)], rtol=1e-5)
        np.testing.assert_allclose(dense[rows, latent], ex_vals[ex_off[latent] : ex_off[latent + 1]], rtol=1e-5)
        # Every non-zero activation of the latent in its examples' windows is on the page, and nothing else.
        expected = {int(r) for row in rows for r in range(row - 5, row + 3)
                    if 0 <= r < len(dense) and contexts[r] == contexts[row] and dense[r, latent] > 0}
        mine = win_rows[win_off[latent] : win_off[latent + 1]]
        assert set(mine.tolist()) == expected
        np.testing.assert_allclose(win_vals[win_off[latent] : win_off[latent + 1]], dense[mine, latent], rtol=1e-5)
    promoted = array(data["decoded"]["promoted"], "<i4").reshape(96, -1)
    logits = tiny.unembed(d.W_dec.detach()[:2])
    assert [vocab[i] for i in promoted[1]] == [tokenizer.decode([int(t)]) for t in logits[1].topk(promoted.shape[1]).indices]


def test_page_data_cannot_end_its_script_tag(tmp_path):
    data = {"meta": {"name": "</script><script>alert(1)</script><!--"}, "note": "</SCRIPT>"}
    path = write_page(tmp_path / "p.html", data)
    text = path.read_text()
    assert "<" not in text.split('id="interp-data">')[1].split("</script>")[0]
    assert embedded_data(path)["meta"]["name"] == data["meta"]["name"]


def test_dashboard_command_writes_a_page_per_dictionary(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(" ".join(np.random.default_rng(2).choice(WORDS, 20_000)))
    runner = CliRunner()
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train-sae", "--model", "tiny:llama", "--layer", "1", "--k", "2,4", "--latents", "32",
                                  "--tokens", "4k", "--batch-size", "512", "--eval-tokens", "1024", "--eval-contexts", "0",
                                  "--corpus", str(corpus), "--context-len", "32", "--store", str(tmp_path / "store"), "--out", str(run)])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["dashboard", str(run), "--out", str(tmp_path / "pages"), "--tokens", "0", "--n", "4"])
    assert result.exit_code == 0, result.output
    pages = sorted(p.name for p in (tmp_path / "pages").glob("*.html"))
    assert pages == ["index.html", "sae-topk-k2-32.html", "sae-topk-k4-32.html"]
    data = embedded_data(tmp_path / "pages" / "sae-topk-k2-32.html")
    held_out = json.loads((run / "sae-topk-k2-32" / "dictionary.json").read_text())["held_out_rows"]
    assert data["meta"]["first_row"] <= held_out[0] and data["meta"]["rows"] >= held_out[1] - held_out[0]
    missing = runner.invoke(app, ["dashboard", str(tmp_path), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "holds no dictionary" in missing.output


@pytest.mark.skipif(browser_problem() is not None, reason=f"no headless browser here: {browser_problem()}")
def test_dashboard_in_a_headless_browser(page, tmp_path):
    from selenium.webdriver.common.by import By

    path, _ = page
    data = embedded_data(path)
    vocab = data["vocab"]
    tokens = array(data["tokens"], "<u2")
    ex_off, ex_rows = array(data["ex_offsets"], "<i4"), array(data["ex_rows"], "<i4")
    promoted = array(data["decoded"]["promoted"], "<i4").reshape(96, -1)
    with headless_chromium() as driver:
        driver.get(path.as_uri())
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
        assert not errors, errors
        items = driver.find_elements(By.CSS_SELECTOR, "#list li")
        assert len(items) == 50 and driver.find_element(By.ID, "count").text == "96 of 96 latents"  # one page in the DOM
        driver.find_element(By.ID, "next").click()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#list li")) == 46

        # Search by token text: the list keeps exactly the latents whose top or promoted tokens contain it.
        def matching(query: str) -> list[int]:
            return [latent for latent in range(96)
                    if any(query in vocab[tokens[r]].lower() for r in ex_rows[ex_off[latent] : ex_off[latent + 1]])
                    or any(query in vocab[t].lower() for t in promoted[latent])]

        query = next(q for q in "wnrsetiaho" if 0 < len(matching(q)) < 96)  # tokens here are single bytes
        expected = matching(query)
        box = driver.find_element(By.ID, "search")
        box.send_keys(query)
        shown = [int(li.get_attribute("data-latent")) for li in driver.find_elements(By.CSS_SELECTOR, "#list li")]
        assert shown == expected[:50] and driver.find_element(By.ID, "count").text == f"{len(expected)} of 96 latents"
        box.clear()
        box.send_keys("17")
        assert 17 in [int(li.get_attribute("data-latent")) for li in driver.find_elements(By.CSS_SELECTOR, "#list li")]

        # A latent's contexts render with its activations as highlights, the top token outlined.
        driver.find_element(By.CSS_SELECTOR, '#list li[data-latent="17"]').click()
        assert driver.find_element(By.CSS_SELECTOR, "#detail h2").text == "Latent 17"
        lines = driver.find_elements(By.CSS_SELECTOR, "#contexts .ctx")
        assert len(lines) == ex_off[18] - ex_off[17] > 0
        peaks = driver.find_elements(By.CSS_SELECTOR, "#contexts .tok.peak")
        assert len(peaks) == len(lines)
        assert all(p.value_of_css_property("background-color").startswith("rgba(242, 142, 43") for p in peaks)
        plain = driver.find_elements(By.CSS_SELECTOR, "#contexts .tok:not(.act)")
        assert plain and all(p.value_of_css_property("background-color") == "rgba(0, 0, 0, 0)" for p in plain[:20])
        assert driver.find_element(By.CSS_SELECTOR, "#contexts .tok.peak").text == vocab[tokens[ex_rows[ex_off[17]]]].replace("\t", "\u2192")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#detail svg rect")) == data["bins"]
        assert "#latent=17" in driver.current_url
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
