"""The language-model data pipeline: bytes round-trip, documents and EOS, the deterministic split, the
memory-mapped cache, windows, and clear errors for bad corpora."""

from __future__ import annotations

import builtins
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from mesacli.errors import MesaError
from mesacli.lm import data as lm_data
from mesacli.lm.spec import DataSpec


def _spec(path, **kw) -> DataSpec:
    return DataSpec(path=str(path), **{"split_block": 64, **kw})


def _stream(data: lm_data.TokenData, spec: DataSpec) -> np.ndarray:
    """Rebuild the whole token stream from the two splits and the block assignment."""
    train, val = iter(np.asarray(data.train)), iter(np.asarray(data.val))
    n = len(data.train) + len(data.val)
    blocks = -(-n // spec.split_block)
    to_val = lm_data.val_blocks(np.arange(blocks), spec.split_seed, spec.val_fraction)
    if not to_val.any():
        to_val[-1] = True
    out = []
    for b in range(blocks):
        size = min(spec.split_block, n - b * spec.split_block)
        source = val if to_val[b] else train
        out += [next(source) for _ in range(size)]
    return np.array(out)


def test_bytes_round_trip_whatever_the_encoding():
    tok = lm_data.load_tokenizer("bytes")
    text = "mesa-layer: Φ̂ = argmin ‖v − Φk‖², λ > 0 ✓"
    ids = tok.encode(text.encode("utf-8"))
    assert ids.max() < 256 and tok.decode(ids) == text
    raw = b"\xff\xfe\x00abc\x80"
    np.testing.assert_array_equal(tok.encode(raw), list(raw))
    assert tok.decode([256]) == "\n" and tok.vocab_size == 257


def test_documents_are_joined_with_eos_and_the_split_is_a_partition_of_the_stream(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (1000, 7, 2500)]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i}.bin").write_bytes(doc)
    (folder / ".hidden").write_bytes(b"never read")
    spec = _spec(folder, val_fraction=0.2)
    data = lm_data.prepare_corpus(spec, tmp_path / "cache")
    expected = np.concatenate([np.frombuffer(docs[0], np.uint8), [256], np.frombuffer(docs[1], np.uint8), [256],
                               np.frombuffer(docs[2], np.uint8)]).astype(np.int64)
    np.testing.assert_array_equal(_stream(data, spec), expected)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert 0.05 < len(data.val) / len(expected) < 0.4


def test_the_split_is_deterministic_and_follows_the_seed(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(os.urandom(20_000))
    a = lm_data.prepare_corpus(_spec(path), tmp_path / "a")
    b = lm_data.prepare_corpus(_spec(path), tmp_path / "b")
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    c = lm_data.prepare_corpus(_spec(path, split_seed=1), tmp_path / "c")
    assert len(c.val) != len(a.val) or not np.array_equal(c.val, a.val)
    share = lm_data.val_blocks(np.arange(100_000), 0, 0.1).mean()
    assert 0.095 < share < 0.105


def test_the_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_bytes(b"abc " * 500)
    spec = _spec(path)
    first = lm_data.prepare_corpus(spec, tmp_path / "cache")
    calls = []
    real = lm_data._write_split
    monkeypatch.setattr(lm_data, "_write_split", lambda *a: calls.append(1) or real(*a))
    again = lm_data.prepare_corpus(spec, tmp_path / "cache")
    assert calls == [] and np.array_equal(again.train, first.train)
    path.write_bytes(b"xyz " * 600)
    changed = lm_data.prepare_corpus(spec, tmp_path / "cache")
    assert calls == [1] and len(changed.train) + len(changed.val) == 2400
    assert lm_data.prepare_corpus(dataclasses.replace(spec, split_block=32), tmp_path / "cache") and calls == [1, 1]


def test_glob_and_embedded_corpus(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(name * 50)
    assert [p.name for p in lm_data.source_files(str(tmp_path / "*.txt"))] == ["a.txt", "b.txt"]
    data = lm_data.prepare_corpus(DataSpec(), tmp_path / "embedded")
    assert len(data.train) + len(data.val) == 466_273  # bytes of the shipped text, one document
    assert "assert" in data.tokenizer.decode(data.train[:5000])


def test_windows(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    w = lm_data.sample_windows(tokens, 33, 8, np.random.default_rng(0))
    assert w.shape == (8, 33) and w.dtype == np.int32
    np.testing.assert_array_equal(np.diff(w, axis=1), 1)  # contiguous slices of the split
    np.testing.assert_array_equal(w, lm_data.sample_windows(tokens, 33, 8, np.random.default_rng(0)))
    e = lm_data.eval_windows(tokens, 100, 16)
    assert e.shape == (16, 100) and e[0, 0] == 0 and e[-1, -1] == 999
    assert lm_data.eval_windows(tokens, 999, 16).shape == (2, 999)  # only two distinct starts exist


@pytest.mark.parametrize("case, fragment", [
    ("missing", "does not exist"), ("empty", "the corpus is empty"), ("no_match", "no files match"),
    ("tokenizer", "no tokenizer file"), ("context", "needs 5001 tokens per window"),
])
def test_bad_corpora_are_clear_errors(case, fragment, tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"" if case == "empty" else b"some text " * 100)
    spec = {"missing": _spec(tmp_path / "nope.txt"), "no_match": _spec(tmp_path / "*.csv"),
            "tokenizer": _spec(path, tokenizer=str(tmp_path / "tok.json"))}.get(case, _spec(path))
    with pytest.raises(MesaError, match=fragment):
        data = lm_data.prepare_corpus(spec, tmp_path / "cache")
        lm_data.check_context(data, 5000)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_bytes(b"x" * 100)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: make the open fail as it would for anyone else

        def denied(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied")
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(lm_data, "open", denied, raising=False)
    with pytest.raises(MesaError, match="cannot read corpus file .*secret.txt: Permission denied"):
        lm_data.prepare_corpus(_spec(path), tmp_path / "cache")


def test_a_tokenizer_file_needs_the_optional_package_or_is_used(tmp_path):
    path = tmp_path / "tokenizer.json"
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        path.write_text("{}")
        with pytest.raises(MesaError, match="needs the `tokenizers` package"):
            lm_data.load_tokenizer(str(path))
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "mesa": 1, "layer": 2, "</s>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    loaded = lm_data.load_tokenizer(str(path))
    assert loaded.eos_id == 3 and loaded.vocab_size == 4
    np.testing.assert_array_equal(loaded.encode(b"mesa layer mesa"), [1, 2, 1])
