"""Shared fixtures: the embedded model (loaded once per session) and tiny random models."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def embedded():
    """SmolLM2-135M, float32 (converted once into the cache dir on first use)."""
    import interp

    return interp.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shakespeare():
    from interp.data import load_corpus

    return load_corpus("shakespeare")
