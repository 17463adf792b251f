"""Fixed-length token contexts from a corpus, in a deterministic order, with a digest.

The documents are tokenized (no special tokens), each followed by a separator token (EOS), and
concatenated into one stream. The stream is cut into windows of ``context_len - 1`` tokens and
each window gets a BOS token in front (``prepend_bos=True``, the SAELens/TransformerLens habit:
every context starts with the same attention-sink token, and later tokens see real text).
Windows are shuffled with ``seed``. When more tokens are asked for than one pass yields,
further passes cut the stream at shifted offsets, so no context repeats exactly.

Every token carries its document index and its offset inside that document (-1 for BOS).
The tokenized stream is cached in the cache dir (keyed by corpus and tokenizer digests).
``digest`` is the sha256 of the exact token array, recorded by stores built from it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from interp.data.corpora import Corpus
from interp.errors import InputError
from interp.paths import atomic_write, interp_home


@dataclass
class TokenContexts:
    tokens: np.ndarray  # int32 [n_contexts, context_len]
    doc_ids: np.ndarray  # int32 [n_contexts, context_len]; -1 for BOS
    doc_positions: np.ndarray  # int32 [n_contexts, context_len]; offset in the document, -1 for BOS
    corpus: str
    corpus_digest: str
    prepend_bos: bool
    seed: int
    passes: int
    stream_tokens: int  # tokens in one pass over the corpus

    @property
    def context_len(self) -> int:
        return int(self.tokens.shape[1])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.tokens, dtype="<i4").tobytes()).hexdigest()


def token_contexts(
    corpus: Corpus,
    tokenizer: Any,
    *,
    context_len: int = 128,
    n_contexts: int | None = None,
    prepend_bos: bool = True,
    seed: int = 0,
) -> TokenContexts:
    """Cut ``corpus`` into ``n_contexts`` contexts of ``context_len`` tokens (all of one pass if None)."""
    if context_len < 2:
        raise InputError(f"context_len={context_len}: need at least 2 tokens")
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is None:
        raise InputError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False")
    eos = getattr(tokenizer, "eos_token_id", None)
    stream, doc_ids, doc_pos = _stream(corpus, tokenizer, eos)
    window = context_len - 1 if prepend_bos else context_len
    per_pass = len(stream) // window
    if per_pass == 0:
        raise InputError(f"corpus {corpus.name!r} has {len(stream)} tokens, fewer than one context of {context_len}")
    wanted = per_pass if n_contexts is None else n_contexts
    passes = math.ceil(wanted / per_pass)
    rng = np.random.default_rng(seed)
    chunks = []
    for p in range(passes):
        offset = (p * window) // passes  # later passes cut the stream at shifted boundaries
        count = (len(stream) - offset) // window
        starts = offset + window * rng.permutation(count)
        chunks.append(starts)
    starts = np.concatenate(chunks)[:wanted]
    index = starts[:, None] + np.arange(window)[None, :]
    tokens, ids, pos = stream[index], doc_ids[index], doc_pos[index]
    if prepend_bos:
        column = np.full((len(starts), 1), -1, dtype=np.int32)
        tokens = np.concatenate([np.full_like(column, bos), tokens], axis=1)
        ids, pos = np.concatenate([column, ids], axis=1), np.concatenate([column, pos], axis=1)
    return TokenContexts(
        tokens=tokens.astype(np.int32), doc_ids=ids.astype(np.int32), doc_positions=pos.astype(np.int32),
        corpus=corpus.name, corpus_digest=corpus.digest, prepend_bos=prepend_bos, seed=seed,
        passes=passes, stream_tokens=len(stream),
    )


def _stream(corpus: Corpus, tokenizer: Any, eos: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tokenized corpus as one stream; cached in the cache dir by corpus and tokenizer digest."""
    key = hashlib.sha256(f"{corpus.digest}:{tokenizer_digest(tokenizer)}:{eos}".encode()).hexdigest()[:24]
    path = interp_home() / "tokens" / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as cached:
                return cached["tokens"], cached["doc_ids"], cached["doc_positions"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable: tokenize again and overwrite it
    stream = _tokenize(corpus, tokenizer, eos)
    atomic_write(path, lambda tmp: _save_npz(tmp, stream))
    return stream


def _save_npz(path: Path, stream: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # a handle: np.savez would append ".npz" to the temporary name
        np.savez(handle, tokens=stream[0], doc_ids=stream[1], doc_positions=stream[2])


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full definition (fast tokenizers) or of its vocabulary."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _tokenize(corpus: Corpus, tokenizer: Any, eos: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    encoded = tokenizer([d.text for d in corpus.documents], add_special_tokens=False)["input_ids"]
    parts, ids, pos = [], [], []
    for index, tokens in enumerate(encoded):
        row = list(tokens) + ([eos] if eos is not None else [])
        parts.append(np.asarray(row, dtype=np.int32))
        ids.append(np.full(len(row), index, dtype=np.int32))
        pos.append(np.arange(len(row), dtype=np.int32))
    return np.concatenate(parts), np.concatenate(ids), np.concatenate(pos)
