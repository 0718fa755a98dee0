"""mesacli.lm.data: bytes in any encoding, documents joined by EOS in sorted order, the block split checked against
an independent splitmix64, the memory-mapped cache (reused, rebuilt, never half-used), windows, and one-line
errors for bad corpora.  No JAX; the whole file runs in a few seconds."""

from __future__ import annotations

import builtins
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mesacli.errors import MesaError
from mesacli.lm import data as lm_data
from mesacli.lm.spec import DataSpec

MASK64 = 2**64 - 1
EOS = 256


def _spec(path, **kw) -> DataSpec:
    return DataSpec(path=None if path is None else str(path), **{"split_block": 64, **kw})


def _splitmix64(x: int) -> int:
    """Reference splitmix64 in Python integers (independent of the numpy version in the module)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _is_val(seed: int, block: int, fraction: float) -> bool:
    return (_splitmix64((_splitmix64(seed & MASK64) + block) & MASK64) >> 11) / 2**53 < fraction


def _expected_split(stream: np.ndarray, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) of a token stream, block by block, with the last block to validation if none went there."""
    blocks = [stream[i:i + spec.split_block] for i in range(0, len(stream), spec.split_block)]
    to_val = [_is_val(spec.split_seed, i, spec.val_fraction) for i in range(len(blocks))]
    if not any(to_val):
        to_val[-1] = True

    def pick(want: bool) -> np.ndarray:
        return np.concatenate([b for b, v in zip(blocks, to_val, strict=True) if v == want] or [np.zeros(0)])

    return pick(False), pick(True)


def _joined(*docs: bytes) -> np.ndarray:
    """The expected byte-token stream: documents with one EOS between two."""
    parts = []
    for i, doc in enumerate(docs):
        parts += ([[EOS]] if i else []) + [list(doc)]
    return np.concatenate([np.asarray(p, np.int64) for p in parts])


def _assert_split(data: lm_data.TokenData, stream: np.ndarray, spec: DataSpec) -> None:
    train, val = _expected_split(stream, spec)
    np.testing.assert_array_equal(np.asarray(data.train), train)
    np.testing.assert_array_equal(np.asarray(data.val), val)


# ----------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("text", ["", "plain ascii\n", "Φ̂ = argmin ‖v − Φk‖² ✓", "日本語のテキスト", "🦙🧠\r\n\t"])
def test_bytes_round_trip(text):
    tok = lm_data.load_tokenizer("bytes")
    ids = tok.encode(text.encode("utf-8"))
    assert ids.dtype == np.int64 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.astype(np.uint16)) == text  # what the memory-mapped splits hold


def test_bytes_are_bytes_whatever_the_encoding():
    tok = lm_data.load_tokenizer("bytes")
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("bytes", 257, 256)
    raw = b"\xff\xfe\x00abc\x80\xc3"
    np.testing.assert_array_equal(tok.encode(raw), [0xFF, 0xFE, 0x00, 97, 98, 99, 0x80, 0xC3])
    assert tok.decode(tok.encode(raw)).endswith("\ufffd") and "abc" in tok.decode(tok.encode(raw))
    assert tok.decode([104, 105, EOS, 33]) == "hi\n!"
    assert lm_data.EOS_NAME == "<eos>"


def test_a_non_utf8_file_is_a_corpus(tmp_path):
    raw = b"\xff\xfe\x00abc" * 300 + bytes(range(256))
    (tmp_path / "latin1.bin").write_bytes(raw)
    spec = _spec(tmp_path / "latin1.bin")
    data = lm_data.prepare_corpus(spec, tmp_path / "cache")
    _assert_split(data, _joined(raw), spec)
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap) and data.train.dtype == np.uint16


def test_a_missing_tokenizer_file_or_package_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(MesaError, match="no tokenizer file at .*tok.json"):
        lm_data.load_tokenizer(str(tmp_path / "tok.json"))
    with pytest.raises(MesaError, match="no tokenizer file"):
        lm_data.prepare_corpus(_spec(None, tokenizer=str(tmp_path / "tok.json")), tmp_path / "cache")
    (tmp_path / "tok.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(MesaError, match="pip install tokenizers"):
        lm_data.load_tokenizer(str(tmp_path / "tok.json"))


def test_a_local_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "mesa": 1, "layer": 2, "\n": 3},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = lm_data.load_tokenizer(str(path))
    assert loaded.eos_id == 4 and loaded.vocab_size == 5  # no EOS token in the file: a new id after the vocabulary
    np.testing.assert_array_equal(loaded.encode(b"mesa layer mesa"), [1, 2, 1])
    assert loaded.decode([1, 4, 2]) == "mesa\nlayer"
    (tmp_path / "a.txt").write_text("mesa layer " * 100)
    (tmp_path / "b.txt").write_text("layer " * 50)
    spec = _spec(tmp_path / "*.txt", tokenizer=str(path), split_block=16)
    data = lm_data.prepare_corpus(spec, tmp_path / "cache")
    _assert_split(data, np.array([1, 2] * 100 + [4] + [2] * 50), spec)


def test_a_tokenizer_file_sees_pieces_cut_after_a_newline(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_data, "PIECE_BYTES", 64)
    text = "".join(f"line {i} {'x' * (i % 50)}\n" for i in range(200)).encode() + b"no newline at the end " * 10
    (tmp_path / "t.txt").write_bytes(text)
    pieces = list(lm_data._text_pieces(tmp_path / "t.txt"))
    assert b"".join(pieces) == text and all(p.endswith(b"\n") for p in pieces[:-1]) and len(pieces) > 20


# ----------------------------------------------------------------------------- documents and the split


def test_documents_in_sorted_order_joined_by_eos_block_by_block(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_data, "PIECE_BYTES", 1000)  # many pieces per file: blocks straddle pieces and files
    rng = np.random.default_rng(1)
    root = tmp_path / "corpus"
    docs = {"a.txt": 2500, "b/c.txt": 7, "b/d/e.txt": 0, "c.txt": 4321}
    content = {}
    for name, size in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        content[name] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        (root / name).write_bytes(content[name])
    for hidden in (".hidden.txt", ".git/objects.txt", "b/.cache/x.txt"):
        (root / hidden).parent.mkdir(parents=True, exist_ok=True)
        (root / hidden).write_bytes(b"never read")
    assert [p.relative_to(root).as_posix() for p in lm_data.source_files(str(root))] == list(docs)
    spec = _spec(root, split_block=100, val_fraction=0.3, split_seed=7)
    data = lm_data.prepare_corpus(spec, tmp_path / "cache")
    stream = _joined(*content.values())
    _assert_split(data, stream, spec)
    assert len(data.val) > 0 and data.meta["train_tokens"] + data.meta["val_tokens"] == len(stream)
    assert [f["size"] for f in data.meta["fingerprint"]["files"]] == list(docs.values())


def test_the_split_is_deterministic_and_follows_the_seed(tmp_path):
    path = tmp_path / "text.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 30_000, dtype=np.uint8).tobytes())
    a = lm_data.prepare_corpus(_spec(path), tmp_path / "a")
    b = lm_data.prepare_corpus(_spec(path), tmp_path / "b")
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    c = lm_data.prepare_corpus(_spec(path, split_seed=1), tmp_path / "c")
    assert not np.array_equal(c.val, a.val)
    assert len(c.train) + len(c.val) == len(a.train) + len(a.val) == 30_000


def test_val_share_is_close_to_val_fraction_on_a_megabyte(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 2**20, dtype=np.uint8).tobytes())
    for fraction in (0.05, 0.1, 0.3):
        spec = _spec(path, split_block=256, val_fraction=fraction)  # 4096 blocks
        data = lm_data.prepare_corpus(spec, tmp_path / f"cache{fraction}")
        share = len(data.val) / 2**20
        assert abs(share - fraction) < 4 * np.sqrt(fraction * (1 - fraction) / 4096), (fraction, share)
    np.testing.assert_array_equal(lm_data.val_blocks(np.arange(500), 3, 0.2),
                                  [_is_val(3, i, 0.2) for i in range(500)])


def test_the_last_block_goes_to_validation_when_no_other_does(tmp_path):
    seed = next(s for s in range(1000) if not any(_is_val(s, i, 0.05) for i in range(5)))
    path = tmp_path / "text.txt"
    path.write_bytes(b"0123456789" * 30)  # 300 tokens = 4 whole blocks of 64 and one of 44
    spec = _spec(path, split_seed=seed, val_fraction=0.05)
    data = lm_data.prepare_corpus(spec, tmp_path / "cache")
    assert len(data.val) == 44 and bytes(data.val.astype(np.uint8)) == (b"0123456789" * 30)[256:]
    _assert_split(data, _joined(path.read_bytes()), spec)


def test_a_corpus_of_one_block_is_too_small_to_split(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"short")
    with pytest.raises(MesaError, match="too small to split: 5 tokens .* data.split_block 64"):
        lm_data.prepare_corpus(_spec(path), tmp_path / "cache")
    assert not (tmp_path / "cache" / "meta.json").exists() and not list((tmp_path / "cache").glob("*.tmp"))


# ----------------------------------------------------------------------------- the cache


def test_the_cache_is_reused_without_reading_the_text(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_bytes(b"reuse me " * 500)
    spec = _spec(path)
    messages = []
    first = lm_data.prepare_corpus(spec, tmp_path / "cache", messages.append)
    assert messages == [f"tokenising 1 file (0.0 MB) into {tmp_path / 'cache'}"]
    stamp = (tmp_path / "cache" / "train.bin").stat().st_mtime_ns

    def no_reading(*args):
        raise AssertionError("the text was read again")

    monkeypatch.setattr(lm_data, "_token_stream", no_reading)
    again = lm_data.prepare_corpus(spec, tmp_path / "cache", messages.append)
    assert len(messages) == 1 and (tmp_path / "cache" / "train.bin").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.val, first.val)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize("change", ["content", "mtime", "split", "truncated_bin", "no_meta", "bad_meta"])
def test_the_cache_is_rebuilt_when_its_inputs_change_or_it_is_damaged(change, tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"abc " * 500)
    spec = _spec(path)
    cache = tmp_path / "cache"
    lm_data.prepare_corpus(spec, cache)
    if change == "content":
        path.write_bytes(b"xyz!" * 600)
    elif change == "mtime":
        path.write_bytes(b"abd " * 500)  # same size
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    elif change == "split":
        spec = _spec(path, split_block=32)
    elif change == "truncated_bin":
        with open(cache / "train.bin", "r+b") as f:
            f.truncate(10)
    elif change == "no_meta":
        (cache / "meta.json").unlink()
    else:
        (cache / "meta.json").write_text("{not json")
    messages = []
    data = lm_data.prepare_corpus(spec, cache, messages.append)
    assert len(messages) == 1  # tokenised again
    _assert_split(data, _joined(path.read_bytes()), spec)
    assert json.loads((cache / "meta.json").read_text())["fingerprint"]["split_block"] == spec.split_block


def test_an_interrupted_preparation_is_redone_never_half_used(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_bytes(b"first " * 1000)
    spec = _spec(path)
    lm_data.prepare_corpus(spec, tmp_path / "cache")
    path.write_bytes(b"second " * 1000)
    real = lm_data._token_stream

    def interrupted(files, tokenizer):
        stream = real(files, tokenizer)
        yield next(stream)
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_data, "_token_stream", interrupted)
    monkeypatch.setattr(lm_data, "PIECE_BYTES", 100)
    with pytest.raises(KeyboardInterrupt):
        lm_data.prepare_corpus(spec, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train.bin", "val.bin"]  # no meta, no temps
    monkeypatch.setattr(lm_data, "_token_stream", real)
    data = lm_data.prepare_corpus(spec, tmp_path / "cache")
    _assert_split(data, _joined(b"second " * 1000), spec)


# ----------------------------------------------------------------------------- sources


def test_glob_inputs_are_sorted_and_skip_hidden_files(tmp_path):
    for name in ("b.txt", "a.txt", "c.md", ".h.txt", "sub/z.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name * 40)
    assert [p.name for p in lm_data.source_files(str(tmp_path / "*.txt"))] == ["a.txt", "b.txt"]
    assert [p.name for p in lm_data.source_files(str(tmp_path / "**" / "*.txt"))] == ["a.txt", "b.txt", "z.txt"]
    spec = _spec(tmp_path / "*.txt", split_block=16)
    data = lm_data.prepare_corpus(spec, tmp_path / "cache")
    _assert_split(data, _joined(b"a.txt" * 40, b"b.txt" * 40), spec)


def test_the_embedded_corpus_needs_no_download(tmp_path):
    assert lm_data.source_files(None) == [lm_data.EMBEDDED_CORPUS] and lm_data.EMBEDDED_CORPUS.is_file()
    messages = []
    data = lm_data.prepare_corpus(DataSpec(), tmp_path / "embedded", messages.append)
    assert messages == [f"tokenising the embedded corpus into {tmp_path / 'embedded'}"]
    total = len(data.train) + len(data.val)
    assert total > 400_000 and 0.05 < len(data.val) / total < 0.15
    text = data.tokenizer.decode(data.train[:20_000])
    assert "assert" in text and "def " in text


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case, fragment", [
    ("missing", "data.path: .*nope.txt does not exist"),
    ("no_match", "data.path: no files match .*\\*.csv"),
    ("empty_dir", "has no \\(non-hidden\\) files"),
    ("empty_file", "the corpus is empty"),
    ("empty_files", "the corpus is empty"),
])
def test_bad_sources_are_one_line_errors(case, fragment, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / ".only_hidden").write_text("x")
    (tmp_path / "empty").mkdir()
    for name in ("1.txt", "2.txt"):
        (tmp_path / "empty" / name).write_bytes(b"")
    path = {"missing": tmp_path / "nope.txt", "no_match": tmp_path / "*.csv", "empty_dir": tmp_path / "docs",
            "empty_file": tmp_path / "empty" / "1.txt", "empty_files": tmp_path / "empty"}[case]
    with pytest.raises(MesaError, match=fragment) as err:
        lm_data.prepare_corpus(_spec(path), tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_an_unreadable_file_names_its_path(tmp_path, monkeypatch):
    (tmp_path / "ok.txt").write_bytes(b"fine " * 100)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"x" * 100)
    secret.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: make the open fail as it does for everybody else

        def denied(file, *args, **kwargs):
            if Path(file) == secret:
                raise PermissionError(13, "Permission denied")
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(lm_data, "open", denied, raising=False)
    with pytest.raises(MesaError, match="cannot read corpus file .*secret.txt: Permission denied"):
        lm_data.prepare_corpus(_spec(tmp_path), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tmp")) and not (tmp_path / "cache" / "meta.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can list a directory without permissions")
def test_an_unreadable_directory_names_its_path(tmp_path):
    (tmp_path / "ok.txt").write_bytes(b"fine " * 100)
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0)
    try:
        with pytest.raises(MesaError, match="cannot read corpus directory .*locked"):
            lm_data.source_files(str(tmp_path))
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_a_context_longer_than_a_split_is_a_clear_error(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"some text " * 100)
    data = lm_data.prepare_corpus(_spec(path), tmp_path / "cache")
    lm_data.check_context(data, min(len(data.train), len(data.val)) - 1)  # exactly one window fits
    with pytest.raises(MesaError, match=f"needs 1001 tokens .*train {len(data.train)}, validation {len(data.val)}.*"
                                        "smaller model.context"):
        lm_data.check_context(data, 1000)
    with pytest.raises(MesaError, match="the val split has only"):
        lm_data.check_context(data, len(data.val))


# ----------------------------------------------------------------------------- windows


def test_sample_windows_are_uniform_contiguous_slices(tmp_path):
    tokens = np.arange(50, dtype=np.uint16)
    w = lm_data.sample_windows(tokens, 10, 2000, np.random.default_rng(0))
    assert w.shape == (2000, 10) and w.dtype == np.int32
    np.testing.assert_array_equal(np.diff(w, axis=1), 1)
    assert w[:, 0].min() == 0 and w[:, 0].max() == 40  # both ends of [0, len - length] are drawn
    assert np.bincount(w[:, 0]).min() > 20  # every start is drawn, about equally often
    np.testing.assert_array_equal(w, lm_data.sample_windows(tokens, 10, 2000, np.random.default_rng(0)))
    assert not np.array_equal(w, lm_data.sample_windows(tokens, 10, 2000, np.random.default_rng(1)))
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="w+", shape=(50,))
    mm[:] = tokens
    np.testing.assert_array_equal(lm_data.sample_windows(mm, 10, 5, np.random.default_rng(3)),
                                  lm_data.sample_windows(tokens, 10, 5, np.random.default_rng(3)))


def test_eval_windows_are_evenly_spaced_and_disjoint_when_they_can_be():
    tokens = np.arange(1000, dtype=np.uint16)
    e = lm_data.eval_windows(tokens, 100, 10)
    assert e.shape == (10, 100) and e.dtype == np.int32
    np.testing.assert_array_equal(e[:, 0], np.arange(0, 1000, 100))  # exactly tiles the split
    np.testing.assert_array_equal(e, lm_data.eval_windows(tokens, 100, 10))
    e = lm_data.eval_windows(tokens, 64, 7)
    assert e[0, 0] == 0 and e[-1, -1] == 999 and np.diff(e[:, 0]).min() >= 64  # spread out, no overlap
    e = lm_data.eval_windows(tokens, 100, 16)  # 16 * 100 > 1000: overlap is unavoidable, spacing even
    assert e.shape == (16, 100) and e[-1, -1] == 999 and np.ptp(np.diff(e[:, 0])) <= 1
    assert lm_data.eval_windows(tokens, 999, 16).shape == (2, 999)  # only two distinct starts exist
    assert lm_data.eval_windows(tokens, 1000, 4).shape == (1, 1000)
    assert lm_data.eval_windows(tokens, 1001, 4).shape == (0, 1001)
