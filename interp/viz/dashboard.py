"""Feature dashboards: one static, self-contained HTML page per dictionary.

The page embeds its data as one compact JSON object (numeric arrays as base64 little-endian typed
arrays, token strings once in a vocabulary) and renders on demand: the latent list one page at a
time, and one latent's details when it is selected, so dictionaries of any size stay responsive.
It shows, per latent: firing density, a histogram of its non-zero activations, its top-activating
contexts with every token shaded by the latent's activation, and the tokens its output direction
promotes and suppresses through the unembedding; a search box filters latents by id or by the
text of their top tokens. No network access is needed to view it.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from interp.dictionary.features import FeatureScan, FeatureSource, decoded_tokens, scan_features
from interp.paths import write_text
from interp.viz.dashboard_page import PAGE


def build_dashboard(source: FeatureSource, store: Any, out: str | Path, *, model: Any = None, rows: tuple[int, int] | None = None,
                    n: int = 20, left: int = 24, right: int = 8, latents: list[int] | None = None, batch_size: int = 4096,
                    progress: bool = True) -> Path:
    """Scan ``rows`` of ``store`` with ``source`` and write the page to ``out`` (an .html path)."""
    from interp.models import load_model

    start = time.perf_counter()
    scan = scan_features(source, store, rows=rows, n=n, latents=latents, batch_size=batch_size, progress=progress)
    model = model if model is not None else load_model(source.model or store.manifest["model"]["name"])
    directions = source.output_directions()
    if directions is not None and latents is not None:
        directions = directions[scan.latent_ids]
    decoded = decoded_tokens(model, directions)
    data = dashboard_data(source, scan, model.tokenizer, decoded, store=store, left=left, right=right)
    data["meta"]["build_seconds"] = round(time.perf_counter() - start, 2)
    return write_page(out, data)


def dashboard_data(source: FeatureSource, scan: FeatureScan, tokenizer: Any, decoded: dict[str, np.ndarray] | None, *,
                   store: Any, left: int, right: int) -> dict[str, Any]:
    """The JSON object the page renders (see the module docstring for the encoding)."""
    if (scan.rows[:, 2] < 0).any():
        from interp.errors import InputError

        raise InputError(f"{store.root} has no token ids (made with write_arrays?): a dashboard needs a harvested store")
    counts = scan.fire_counts
    ex_offsets = np.concatenate([[0], np.cumsum((scan.top_rows >= 0).sum(1))])
    has = scan.top_rows >= 0
    ex_rows, ex_values = scan.top_rows[has], scan.top_values[has]
    ex_latent = np.repeat(np.arange(len(scan.latent_ids)), has.sum(1))
    win_latent, win_rows, win_values = _window_activations(scan, ex_latent, ex_rows, left, right)
    win_offsets = np.concatenate([[0], np.cumsum(np.bincount(win_latent, minlength=len(scan.latent_ids)))])

    used = [scan.rows[:, 2]] + ([decoded["promoted"].ravel(), decoded["suppressed"].ravel()] if decoded else [])
    vocab_ids = np.unique(np.concatenate(used))

    def to_vocab(ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(vocab_ids, ids)

    token_type = "u16" if len(vocab_ids) <= 65535 else "u32"
    token_dtype = "<u2" if token_type == "u16" else "<u4"

    meta = {
        "name": source.name, "kind": source.kind, "site": source.site, "model": source.model or store.manifest["model"]["name"],
        "store": str(store.root), "corpus": store.manifest["corpus"]["name"], "first_row": scan.first_row,
        "rows": scan.n_rows, "n_latents": int(source.n_latents), "shown_latents": len(scan.latent_ids),
        "dead": int((counts == 0).sum()), "contexts": n_examples(scan), "left": left, "right": right,
        "created": time.strftime("%Y-%m-%d %H:%M"),
    }
    data: dict[str, Any] = {
        "meta": meta,
        "latent_ids": _b64(scan.latent_ids, "<i4"),
        "density": _b64(scan.density, "<f4"),
        "max": _b64(scan.max_activation, "<f4"),
        "bins": int(scan.histograms.shape[1]),
        "hist": _b64(scan.histograms, "<i4"),
        "vocab": [tokenizer.decode([int(t)]) for t in vocab_ids],
        "token_type": token_type,
        "tokens": _b64(to_vocab(scan.rows[:, 2]), token_dtype),
        "context_starts": _b64(scan.context_starts(), "<i4"),
        "ex_offsets": _b64(ex_offsets, "<i4"), "ex_rows": _b64(ex_rows, "<i4"), "ex_values": _b64(ex_values, "<f4"),
        "win_offsets": _b64(win_offsets, "<i4"), "win_rows": _b64(win_rows, "<i4"), "win_values": _b64(win_values, "<f4"),
        "decoded": None,
    }
    if decoded:
        k = decoded["promoted"].shape[1]
        data["decoded"] = {"k": k, **{name: _b64(to_vocab(decoded[name]) if name in ("promoted", "suppressed") else decoded[name],
                                                  "<i4" if name in ("promoted", "suppressed") else "<f4")
                                      for name in ("promoted", "promoted_logits", "suppressed", "suppressed_logits")}}
    return data


def n_examples(scan: FeatureScan) -> int:
    return int((scan.top_rows >= 0).sum())


def _window_activations(scan: FeatureScan, ex_latent: np.ndarray, ex_rows: np.ndarray, left: int, right: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero activations of each example's latent on the tokens of its window (deduplicated)."""
    offsets = np.arange(-left, right + 1)
    rows = ex_rows[:, None] + offsets[None, :]
    start, stop = scan.context_bounds(ex_rows)
    valid = (rows >= start[:, None]) & (rows < stop[:, None])
    latent = np.broadcast_to(ex_latent[:, None], rows.shape)[valid]
    rows = rows[valid]
    keys = np.unique(latent.astype(np.int64) * scan.n_rows + rows)  # sorted: by latent, then row
    latent, rows = keys // scan.n_rows, keys % scan.n_rows
    values = scan.activation_at(latent, rows)
    nonzero = values > 0
    return latent[nonzero], rows[nonzero], values[nonzero]


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(np.asarray(array).astype(dtype)).tobytes()).decode("ascii")


def write_page(path: str | Path, data: dict[str, Any]) -> Path:
    """The page: PAGE with the title and the data inlined (every ``<`` escaped, so no string can end the script)."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    title = f"{data['meta']['name']}: feature dashboard"
    page = PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    return write_text(path, page)


def write_index(folder: Path, pages: list[Path]) -> Path:
    """``index.html`` linking the pages of several dictionaries."""
    items = "".join(f'<li><a href="{html.escape(p.name)}">{html.escape(p.stem)}</a></li>' for p in pages)
    return write_text(folder / "index.html",
                      f"<!doctype html><meta charset='utf-8'><title>dashboards</title><h1>Feature dashboards</h1><ul>{items}</ul>")


def dashboard_from_folder(dictionary: str | Path, out: str | Path, *, store: str | Path | None = None, tokens: int | None = None,
                          n: int = 20, latents: list[int] | None = None, model: Any = None, progress: bool = True) -> list[Path]:
    """Pages for a dictionary folder, or for every dictionary in a training-run folder; returns their paths."""
    from interp.dictionary.features import DictionaryFeatures, scan_rows
    from interp.dictionary.io import META, load_dictionary, read_meta
    from interp.errors import InputError
    from interp.snmf.factors import META as SNMF_META
    from interp.store import ActivationStore

    folder = Path(dictionary)
    if (folder / SNMF_META).is_file():
        return [_snmf_dashboard(folder, Path(out), store=store, tokens=tokens, n=n, latents=latents, model=model, progress=progress)]
    folders = [folder] if (folder / META).is_file() else sorted(p.parent for p in folder.glob(f"*/{META}"))
    if not folders:
        raise InputError(f"{folder} holds no dictionary ({META}), no SNMF ({SNMF_META}) and no dictionary folders")
    out = Path(out)
    pages = []
    for each in folders:
        if model is None:  # one model for every page
            from interp.models import load_model

            meta = read_meta(each)
            model = load_model(meta["config"]["model"] or ActivationStore(store or meta["store"]).manifest["model"]["name"])
        meta = read_meta(each)
        store_path = store or meta.get("store")
        if not store_path:
            raise InputError(f"{each} does not record its store; pass --store")
        opened = ActivationStore(store_path)
        held_out = meta.get("held_out_rows") if store is None or Path(store) == Path(meta.get("store", "")) else None
        rows = scan_rows(opened, tokens, held_out)
        source = DictionaryFeatures(load_dictionary(each, d_in=opened.d(meta["config"]["input_site"])), name=each.name)
        pages.append(build_dashboard(source, opened, out / f"{each.name}.html", model=model, rows=rows, n=n, latents=latents,
                                     progress=progress))
    if len(pages) > 1:
        write_index(out, pages)
    return pages


def _snmf_dashboard(folder: Path, out: Path, *, store: str | Path | None, tokens: int | None, n: int,
                    latents: list[int] | None, model: Any, progress: bool) -> Path:
    """The page for an SNMF folder (``interp snmf`` output level): rows after the fitted ones by default."""
    from interp.dictionary.features import scan_rows
    from interp.errors import InputError
    from interp.models import load_model
    from interp.snmf import SNMF
    from interp.snmf.report import SNMFFeatures
    from interp.store import ActivationStore

    snmf = SNMF.load(folder)
    store_path = store or snmf.source.get("store")
    if not store_path:
        raise InputError(f"{folder} does not record its store; pass --store")
    opened = ActivationStore(store_path)
    model = model if model is not None else load_model(snmf.source.get("model") or opened.manifest["model"]["name"])
    fitted_stop = snmf.source.get("rows", [0, 0])[1] if store is None else 0
    held_out = (fitted_stop, opened.n_rows) if fitted_stop < opened.n_rows else None
    rows = scan_rows(opened, tokens, held_out)
    return build_dashboard(SNMFFeatures(snmf, model, name=folder.name), opened, out / f"{folder.name}.html", model=model,
                           rows=rows, n=n, latents=latents, progress=progress)
