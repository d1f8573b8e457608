"""Data from the user's own files: .txt/.jsonl/directories, a given tokenizer.json, uint32 ids,
the content-hashed cache key, and one clear error per mistake."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cotrain.core.errors import UsageError
from cotrain.data import DataConfig, DataError, ShardReader, prepare, validation_batches
from cotrain.data.prepare import cache_key
from cotrain.data.tokenizer import token_dtype
from cotrain.models.hf import smollm2_available

pytestmark = pytest.mark.timeout(60)
# the module, not the package's `prepare` function of the same name
prepare_mod = importlib.import_module("cotrain.data.prepare")

POEM = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))


def _corpus(root: Path) -> Path:
    """corpus/a.txt, corpus/sub/b.jsonl (two documents, one empty), a hidden and a .md file."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(POEM)
    lines = [
        json.dumps({"text": "First JSONL document.\n" * 40, "id": 1}),
        "",
        json.dumps({"text": ""}),
        json.dumps({"text": "Second one, with ünïcode.\n" * 40}),
    ]
    (root / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n")
    (root / ".hidden.txt").write_text("never read\n")
    (root / "notes.md").write_text("not a text source\n")
    return root


def _cfg(tmp_path: Path, sources: list[str], **kw: object) -> DataConfig:
    return DataConfig.model_validate(
        {
            "sources": sources,
            "cache_dir": str(tmp_path / "cache"),
            "vocab_size": 300,
            "seq_len": 16,
            "batch_size": 4,
            "num_shards": 2,
            **kw,
        }
    )


def _wordlevel(path: Path, words: list[str], *, eos: str | None = None) -> Path:
    """A real Hugging Face tokenizer.json (a word-level model) with ``words`` as its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if eos is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos}}))
    return path


def test_directory_of_txt_and_jsonl(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path, [str(corpus)])
    data = prepare(cfg)
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["files"] == [f"{corpus}/a.txt", f"{corpus}/sub/b.jsonl"]  # sorted, no hidden
    assert meta["documents"] == 3 and data.dtype == "uint16"  # the empty JSONL text is skipped
    assert meta["eot"] == "<|endoftext|>"
    tok = data.tokenizer()
    train = np.asarray(data.train())
    parts = np.split(train, np.flatnonzero(train == data.eot_id))
    docs = [tok.decode(part.tolist()) for part in parts]
    assert docs[0] == POEM[: len(docs[0])] and len(docs[0]) > 0.9 * len(POEM)
    assert docs[1].startswith("First JSONL document.")
    assert docs[2].startswith("Second one, with ünïcode.")
    reader = ShardReader(data, cfg, worker_index=1)
    assert reader.next().inputs.shape == (4, 16) and len(validation_batches(data, cfg)) == 8
    # A single .jsonl file and a single .txt file are sources too, in the order given.
    both = prepare(_cfg(tmp_path, [str(corpus / "sub" / "b.jsonl"), str(corpus / "a.txt")]))
    assert json.loads((both.path / "meta.json").read_text())["documents"] == 3
    assert both.key != data.key  # another order, other tokens


def test_text_field_and_cache_key_follow_the_content(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path, [str(corpus)])
    key = cache_key(cfg)
    assert prepare(cfg).key == key
    moved = tmp_path / "elsewhere"
    shutil.copytree(corpus, moved)
    assert cache_key(_cfg(tmp_path, [str(moved)])) == key  # same content elsewhere: same tokens
    (corpus / "a.txt").write_text(POEM.replace("fox", "cat"))
    changed = cache_key(cfg)
    assert changed != key and prepare(cfg).key == changed
    (corpus / "a.txt").write_text(POEM)
    assert cache_key(cfg) == key  # back to the old content, back to the old tokens
    assert cache_key(_cfg(tmp_path, [str(corpus)], text_field="body")) != key
    assert cache_key(_cfg(tmp_path, [str(corpus)], vocab_size=400)) != key
    (tmp_path / "jl").mkdir()
    (tmp_path / "jl" / "x.jsonl").write_text(json.dumps({"body": POEM}) + "\n")
    data = prepare(_cfg(tmp_path, [str(tmp_path / "jl")], text_field="body"))
    assert data.tokenizer().decode(np.asarray(data.train())[:5].tolist()).startswith("Line 0")


def test_given_tokenizer_is_used_and_hashed(tmp_path: Path) -> None:
    words = ["<unk>", "</s>", "the", "quick", "fox", "jumps"]
    tok_dir = _wordlevel(tmp_path / "tok", words, eos="</s>")
    (tmp_path / "t.txt").write_text("the quick fox jumps\n" * 50)
    cfg = _cfg(tmp_path, [str(tmp_path / "t.txt")], tokenizer=str(tok_dir))
    data = prepare(cfg)
    assert (data.vocab_size, data.eot_id) == (6, 1)  # eos from tokenizer_config.json
    assert np.asarray(data.train())[:5].tolist() == [2, 3, 4, 5, 2]
    assert data.tokenizer_path.read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    # The file itself works as well as its directory; "bpe" trains our own even when the model
    # offers a tokenizer; with tokenizer unset, the model's (tokenizer_file) is used.
    as_file = _cfg(tmp_path, [str(tmp_path / "t.txt")], tokenizer=str(tok_dir / "tokenizer.json"))
    assert prepare(as_file).key == data.key
    plain = _cfg(tmp_path, [str(tmp_path / "t.txt")])
    assert prepare(plain, tokenizer_file=tok_dir / "tokenizer.json").key == data.key
    bpe = _cfg(tmp_path, [str(tmp_path / "t.txt")], tokenizer="bpe")
    assert prepare(bpe, tokenizer_file=tok_dir / "tokenizer.json").vocab_size > 256
    _wordlevel(tok_dir, [*words, "dog"], eos="</s>")  # the tokenizer changed: new tokens
    assert cache_key(cfg) != data.key


@pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 not installed")
def test_smollm2_tokenizer_separates_documents_with_endoftext(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from cotrain.models.hf import smollm2_dir

    tok_file = smollm2_dir() / "tokenizer.json"
    (tmp_path / "t.txt").write_text(POEM)
    data = prepare(_cfg(tmp_path, [str(tmp_path / "t.txt")]), tokenizer_file=tok_file)
    assert (data.vocab_size, data.eot_id, data.dtype) == (49152, 0, "uint16")
    train = np.asarray(data.train())
    expect = Tokenizer.from_file(str(tok_file)).encode(POEM[:200], add_special_tokens=False).ids
    assert train[: len(expect) - 1].tolist() == expect[:-1] and train[-1] == 0


def test_large_vocabulary_is_stored_as_uint32(tmp_path: Path) -> None:
    words = ["<unk>", "<|endoftext|>"] + [f"w{i}" for i in range(2, 70_000)]
    tok_dir = _wordlevel(tmp_path / "tok", words)
    text = " ".join(f"w{i}" for i in range(69_000, 70_000)) + "\n"
    (tmp_path / "t.txt").write_text(text * 4)
    cfg = _cfg(tmp_path, [str(tmp_path / "t.txt")], tokenizer=str(tok_dir), seq_len=8)
    data = prepare(cfg)
    assert data.dtype == "uint32" and data.train().dtype == np.uint32 and data.eot_id == 1
    assert data.train()[:3].tolist() == [69_000, 69_001, 69_002]
    batch = ShardReader(data, cfg, worker_index=0).next()
    assert int(batch.inputs.max()) > 65_535 and int(batch.inputs.max()) < 70_000
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


def test_long_documents_are_tokenized_in_pieces_with_identical_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "".join(f"Para {i}.\n  indented {i}\n\nNext\n" for i in range(300))
    (tmp_path / "t.txt").write_text(text)
    whole = prepare(_cfg(tmp_path, [str(tmp_path / "t.txt")], val_fraction=0.01))
    monkeypatch.setattr(prepare_mod, "_PIECE_CHARS", 50)
    pieces = list(prepare_mod._pieces(text))
    assert "".join(pieces) == text and len(pieces) > 100
    shutil.rmtree(whole.path)
    again = prepare(_cfg(tmp_path, [str(tmp_path / "t.txt")], val_fraction=0.01))
    assert np.array_equal(np.asarray(again.train()), np.asarray(whole.train()))


def test_an_interrupt_leaves_no_partial_cache(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(POEM)
    cfg = _cfg(tmp_path, [str(tmp_path / "t.txt")])

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "tokenize train":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=interrupt)
    out = cfg.cache_path() / "data" / cache_key(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]  # no meta, no .tmp
    assert prepare(cfg).train_tokens > 0


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: str(p / "missing.txt"), "missing.txt' does not exist"),
        (lambda p: _write(p / "notes.md", "x"), r"neither a \.txt nor a \.jsonl"),
        (lambda p: _write(p / "empty.txt", " \n"), "empty.txt holds no text"),
        (lambda p: _write(p / "e.jsonl", "\n\n"), "e.jsonl holds no text"),
        (lambda p: _mkdir(p / "d", {"x.md": "a"}), "holds no .txt or .jsonl files"),
        (lambda p: _mkdir(p / "d", {"x.txt": "", "y.jsonl": ""}), "'.*d' holds no text"),
        (lambda p: _write(p / "b.jsonl", '{"text": "ok"}\n{"text": oops}\n'), "line 2 is not JSON"),
        (lambda p: _write(p / "b.jsonl", '\n{"body": "x"}\n'), 'line 2 has no "text" field'),
        (lambda p: _write(p / "b.jsonl", '["text"]\n'), 'line 1 has no "text" field'),
        (lambda p: _write(p / "b.jsonl", '{"text": 3}\n'), '"text" is a int, not a string'),
        (lambda p: _write_bytes(p / "l.txt", b"caf\xe9\n"), "byte 3 is not UTF-8"),
    ],
)
def test_source_errors_are_one_clear_line(tmp_path: Path, setup, match: str) -> None:
    source = setup(tmp_path)
    with pytest.raises(DataError, match=match) as e:
        prepare(_cfg(tmp_path, [source]))
    assert "\n" not in str(e.value) and isinstance(e.value, UsageError | ValueError)


def test_tokenizer_and_config_errors(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(POEM)
    src = [str(tmp_path / "t.txt")]
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "junk.json").write_text("{not json")
    no_eot = _wordlevel(tmp_path / "noeot", ["<unk>", "the"])
    for tokenizer, match in [
        (str(tmp_path / "nope"), "'.*nope' does not exist"),
        (str(tmp_path / "empty_dir"), "holds no tokenizer.json"),
        (str(tmp_path / "junk.json"), "is not a Hugging Face tokenizer.json"),
        (str(no_eot), "has no end-of-text token"),
    ]:
        with pytest.raises(DataError, match=match) as e:
            prepare(_cfg(tmp_path, src, tokenizer=tokenizer))
        assert "\n" not in str(e.value)
    for bad, match in [
        ({"sources": []}, "sources is empty"),
        ({"sources": ["a.txt", "a.txt"]}, "twice"),
        ({"sources": [" "]}, "empty string"),
        ({"sources": ["a.txt"], "text_field": ""}, "text_field"),
        ({"sources": ["a.txt"], "tokenizer": ""}, "tokenizer is empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            DataConfig.model_validate(bad)
    with pytest.raises(DataError, match="num_shards"):
        cfg = _cfg(tmp_path, src, num_shards=1000)
        ShardReader(prepare(cfg), cfg, worker_index=0)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _mkdir(path: Path, files: dict[str, str]) -> str:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return str(path)
