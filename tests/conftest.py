"""Shared fixtures: the embedded model (loaded once per session) and tiny random models."""

from __future__ import annotations

import os
import warnings

import numpy as np
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


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A few hundred kB of varied text (byte-level tokens for the tiny models), for harvest tests."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "quiet", "seven", "north", "ember", "tide"]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(rng.choice(words, size=60_000)))
    return path


@pytest.fixture
def run_until_killed():
    """``run(trainer, step)``: run a ``Trainer`` and stop it inside the step after ``step``, as a kill would."""

    class Killed(Exception):
        pass

    def run(trainer, step: int) -> None:
        real_step = trainer.train_step

        def step_then_die(batch):
            if trainer.step == step:
                raise Killed
            return real_step(batch)

        trainer.train_step = step_then_die
        with pytest.raises(Killed):
            trainer.run()

    return run
