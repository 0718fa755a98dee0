"""Text corpora for the language models: local files only, byte tokens by default, memory-mapped storage.

A corpus is a file, a directory (every non-hidden file below it, sorted) or a glob; ``None`` is the embedded
default corpus (``corpus/python_reference.txt.gz``).  Files are documents: their tokens are concatenated
with one EOS token between two files.  The stream is cut into blocks of ``split_block`` tokens and block i
goes to validation iff splitmix64(split_seed, i) / 2^64 < val_fraction (deterministic, independent of the
machine); the train and validation tokens are written once, in stream order, to ``train.bin`` / ``val.bin``
(raw uint16/uint32) under a cache directory and opened with ``np.memmap``, so corpora larger than RAM work.
Files are read in pieces, never whole.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mesacli.errors import MesaError
from mesacli.lm.spec import DataSpec

EOS_NAME = "<eos>"
EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus" / "python_reference.txt.gz"
PIECE_BYTES = 16 * 2**20
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Byte tokens (ids 0..255, EOS = 256) or a local tokenizer.json (HuggingFace ``tokenizers``)."""

    kind: str  # "bytes" or the tokenizer.json path
    vocab_size: int
    eos_id: int
    _hf: object = dataclasses.field(default=None, repr=False, compare=False)

    def encode(self, data: bytes) -> np.ndarray:
        """Token ids (int64) of raw bytes; byte tokens accept any bytes, UTF-8 or not."""
        if self._hf is None:
            return np.frombuffer(data, np.uint8).astype(np.int64)
        return np.asarray(self._hf.encode(data.decode("utf-8", errors="replace")).ids, np.int64)

    def decode(self, ids) -> str:
        """Text of token ids; EOS becomes a newline, invalid UTF-8 the replacement character."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self._hf is None:
            return b"".join(b"\n" if i == self.eos_id else bytes([i]) for i in ids).decode("utf-8", errors="replace")
        pieces, run = [], []
        for i in ids + [self.eos_id]:
            if i == self.eos_id:
                pieces.append(self._hf.decode(run))
                run = []
            else:
                run.append(i)
        return "\n".join(pieces)


def load_tokenizer(kind: str) -> Tokenizer:
    """'bytes', or the path of a local tokenizer.json (needs the optional `tokenizers` package)."""
    if kind == "bytes":
        return Tokenizer("bytes", 257, 256)
    path = Path(kind)
    if not path.is_file():
        raise MesaError(f"data.tokenizer: no tokenizer file at {path}")
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise MesaError("data.tokenizer: reading a tokenizer.json needs the `tokenizers` package "
                        "(pip install tokenizers), or use tokenizer: bytes") from None
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
        raise MesaError(f"data.tokenizer: cannot read {path}: {err}") from None
    vocab = hf.get_vocab_size(with_added_tokens=True)
    for name in ("<|endoftext|>", "</s>", EOS_NAME):
        eos = hf.token_to_id(name)
        if eos is not None:
            return Tokenizer(str(path), vocab, eos, hf)
    return Tokenizer(str(path), vocab + 1, vocab, hf)


def source_files(path: str | None) -> list[Path]:
    """The documents of a corpus: the embedded corpus (None), a file, a directory's files or a glob's."""
    if path is None:
        return [EMBEDDED_CORPUS]
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = []
        for root, dirs, names in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [Path(root) / n for n in names if not n.startswith(".") and (Path(root) / n).is_file()]
        if not files:
            raise MesaError(f"data.path: directory {p} has no files")
        return sorted(files)
    if glob.has_magic(str(p)):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise MesaError(f"data.path: no files match {path}")
        return files
    raise MesaError(f"data.path: {path} does not exist")


def _read_pieces(path: Path) -> Iterator[bytes]:
    """The bytes of one document in pieces of at most PIECE_BYTES (gzip-decompressed for the embedded corpus)."""
    try:
        opener = gzip.open if path == EMBEDDED_CORPUS else open
        with opener(path, "rb") as f:
            while piece := f.read(PIECE_BYTES):
                yield piece
    except OSError as err:
        raise MesaError(f"cannot read corpus file {path}: {err.strerror or err}") from None


def _token_stream(files: list[Path], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Token ids of all documents in order, with one EOS between two documents.  (A non-byte tokenizer
    sees each document whole: pieces would split its merges.)"""
    for index, path in enumerate(files):
        if index:
            yield np.array([tokenizer.eos_id], np.int64)
        if tokenizer.kind == "bytes":
            for piece in _read_pieces(path):
                yield tokenizer.encode(piece)
        else:
            yield tokenizer.encode(b"".join(_read_pieces(path)))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def val_blocks(block_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True for the validation blocks: splitmix64(splitmix64(seed) + i) / 2^64 < fraction."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed & (2**64 - 1)], np.uint64))[0]
        h = _splitmix64(block_ids.astype(np.uint64) + base)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53) < fraction


@dataclasses.dataclass(frozen=True)
class TokenData:
    train: np.ndarray  # 1-D memmap of token ids
    val: np.ndarray
    tokenizer: Tokenizer
    meta: dict


def _fingerprint(spec: DataSpec, files: list[Path], tokenizer: Tokenizer) -> dict:
    stats = []
    for f in files:
        try:
            st = f.stat()
        except OSError as err:
            raise MesaError(f"cannot read corpus file {f}: {err.strerror or err}") from None
        stats.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"format": FORMAT_VERSION, "files": stats, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "val_fraction": spec.val_fraction, "split_block": spec.split_block, "split_seed": spec.split_seed}


def _dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _open(cache_dir: Path, meta: dict, tokenizer: Tokenizer) -> TokenData:
    dtype = _dtype(tokenizer.vocab_size)

    def load(name):
        n = meta[f"{name}_tokens"]
        return np.memmap(cache_dir / f"{name}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)

    return TokenData(load("train"), load("val"), tokenizer, meta)


def prepare_corpus(spec: DataSpec, cache_dir: Path, progress: Callable[[str], None] | None = None) -> TokenData:
    """Tokenise and split the corpus into cache_dir/{train,val}.bin (reused while the files, tokenizer and
    split settings are unchanged; written under temporary names, meta.json last, so a half-written cache
    is never used)."""
    tokenizer = load_tokenizer(spec.tokenizer)
    files = source_files(spec.path)
    fingerprint = _fingerprint(spec, files, tokenizer)
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("fingerprint") == fingerprint:
            return _open(cache_dir, meta, tokenizer)
    if progress:
        megabytes = sum(s["size"] for s in fingerprint["files"]) / 1e6
        what = "the embedded corpus" if files == [EMBEDDED_CORPUS] else (
            f"{len(files)} file{'s' if len(files) > 1 else ''} ({megabytes:.1f} MB)")
        progress(f"tokenising {what} into {cache_dir}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        counts = _write_split(files, tokenizer, spec, cache_dir, _dtype(tokenizer.vocab_size))
    except OSError as err:
        raise MesaError(f"cannot write the token cache in {cache_dir}: {err.strerror or err}") from None
    if counts["train"] + counts["val"] == 0:
        raise MesaError(f"the corpus is empty: {', '.join(str(f) for f in files[:3])} hold no text")
    if counts["train"] == 0:
        raise MesaError(f"the corpus is too small to split: {counts['val']} tokens in one block of data.split_block "
                        f"{spec.split_block}; use a smaller data.split_block")
    meta = {"fingerprint": fingerprint, "train_tokens": counts["train"], "val_tokens": counts["val"]}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(meta_path)
    return _open(cache_dir, meta, tokenizer)


def _write_split(files, tokenizer, spec: DataSpec, cache_dir: Path, dtype) -> dict:
    """Stream the tokens into train.bin / val.bin block by block; returns the token counts.  One block is held
    back until the next exists, so the last block can go to validation when no other block did."""
    tmp = {name: cache_dir / f"{name}.bin.tmp" for name in ("train", "val")}
    counts, index = {"train": 0, "val": 0}, 0
    with open(tmp["train"], "wb") as out_train, open(tmp["val"], "wb") as out_val:
        outs = {"train": out_train, "val": out_val}

        def emit(block: np.ndarray, last: bool) -> None:
            nonlocal index
            is_val = bool(val_blocks(np.array([index]), spec.split_seed, spec.val_fraction)[0])
            name = "val" if is_val or (last and counts["val"] == 0) else "train"
            outs[name].write(block.astype(dtype).tobytes())
            counts[name] += len(block)
            index += 1

        pending, held = np.zeros(0, np.int64), None
        for ids in _token_stream(files, tokenizer):
            pending = np.concatenate([pending, ids])
            while len(pending) >= spec.split_block:
                if held is not None:
                    emit(held, last=False)
                held, pending = pending[: spec.split_block], pending[spec.split_block:]
        if len(pending):
            if held is not None:
                emit(held, last=False)
            held = pending
        if held is not None:
            emit(held, last=True)
    for name, path in tmp.items():
        path.replace(cache_dir / f"{name}.bin")
    return counts


def check_context(data: TokenData, context: int) -> None:
    """Both splits must hold at least one window of context + 1 tokens."""
    need = context + 1
    for name in ("train", "val"):
        have = len(getattr(data, name))
        if have < need:
            raise MesaError(f"model.context {context} needs {need} tokens per window but the {name} split has only "
                            f"{have} (train {len(data.train)}, validation {len(data.val)}); use a smaller "
                            f"model.context, a larger corpus or another data.val_fraction")


def sample_windows(tokens: np.ndarray, length: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """[batch, length] int32 windows at uniform random starts in [0, len(tokens) - length]."""
    starts = rng.integers(0, len(tokens) - length + 1, size=batch)
    return np.stack([np.asarray(tokens[s:s + length]) for s in starts]).astype(np.int32)


def eval_windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
    """[count', length] int32 windows at evenly spaced starts over the split (deterministic);
    count' = min(count, number of possible starts)."""
    last = len(tokens) - length
    starts = np.unique(np.linspace(0, last, num=min(count, last + 1)).round().astype(np.int64))
    return np.stack([np.asarray(tokens[s:s + length]) for s in starts]).astype(np.int32)
