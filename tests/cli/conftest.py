"""Fixtures of the CLI tests (helpers: ``cli_harness``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_harness import Cotrain, run_cotrain, write_toml
from diloco_harness import tiny_train_config, write_fake_shakespeare


@pytest.fixture
def cotrain() -> Cotrain:
    return run_cotrain


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    write_fake_shakespeare(cache)
    return cache


@pytest.fixture
def tiny_toml(tiny_cache: Path, tmp_path: Path) -> Callable[..., Path]:
    """``tiny_toml(**overrides)``: a DiLoCo config for a ~20k-parameter GPT, out_dir in tmp."""

    def make(**overrides: Any) -> Path:
        cfg = tiny_train_config(tiny_cache, tmp_path / "run", **overrides)
        return write_toml(tmp_path / "tiny.toml", cfg)

    return make
