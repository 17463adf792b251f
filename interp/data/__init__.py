"""Corpora and token contexts: what the model reads."""

from interp.data.contexts import TokenContexts, token_contexts
from interp.data.corpora import BUILTIN, Corpus, Document, load_corpus

__all__ = ["BUILTIN", "Corpus", "Document", "TokenContexts", "load_corpus", "token_contexts"]
