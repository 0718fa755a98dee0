"""Text corpora for the language models: local files only, byte tokens by default, memory-mapped storage.

A corpus is a file, a directory (every non-hidden file below it, sorted) or a glob; ``None`` is the embedded
default corpus (``corpus/python_reference.txt.gz``).  Files are documents: their tokens are concatenated
with one EOS token between two files.  The stream is cut into blocks of ``split_block`` tokens and block i
goes to validation iff splitmix64(splitmix64(split_seed) + i) / 2^64 < val_fraction (deterministic, independent
of the machine); the train and validation tokens are written once, in stream order, to ``train.bin`` / ``val.bin``
(raw uint16/uint32) under a cache directory and opened with ``np.memmap``, so corpora larger than RAM work.
Files are read in pieces, never whole.
"""

from __future__ import annotations

import contextlib
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
FORMAT_VERSION = 2
SPLITS = ("train", "val")


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
        encoding = self._hf.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)
        return np.asarray(encoding.ids, np.int64)

    def decode(self, ids) -> str:
        """Text of token ids; EOS becomes a newline, invalid UTF-8 the replacement character."""
        ids_N = np.asarray(ids, np.int64).reshape(-1)
        if self._hf is None:
            return np.where(ids_N == self.eos_id, 10, ids_N).astype(np.uint8).tobytes().decode("utf-8", "replace")
        runs = np.split(ids_N, np.flatnonzero(ids_N == self.eos_id))  # every run but the first starts with EOS
        return "\n".join(self._hf.decode(run[run != self.eos_id].tolist()) for run in runs)


def load_tokenizer(kind: str) -> Tokenizer:
    """'bytes', or the path of a local tokenizer.json (needs the optional `tokenizers` package; never downloads)."""
    if kind == "bytes":
        return Tokenizer("bytes", 257, 256)
    path = Path(kind).expanduser()
    if not path.is_file():
        raise MesaError(f"data.tokenizer: no tokenizer file at {path}")
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise MesaError("data.tokenizer: reading a tokenizer.json needs the `tokenizers` package "
                        "(pip install tokenizers), or use tokenizer: bytes") from None
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - any read or parse failure is a bad file
        raise MesaError(f"data.tokenizer: cannot read {path}: {' '.join(str(err).split())[:200]}") from None
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
        def unreadable(err: OSError):
            raise MesaError(f"cannot read corpus directory {err.filename}: {err.strerror or err}")

        files = []
        for root, dirs, names in os.walk(p, onerror=unreadable):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [Path(root) / n for n in names if not n.startswith(".") and (Path(root) / n).is_file()]
        if not files:
            raise MesaError(f"data.path: directory {p} has no (non-hidden) files")
        return sorted(files)
    if p.exists():
        raise MesaError(f"data.path: {path} is neither a regular file nor a directory")
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


def _text_pieces(path: Path) -> Iterator[bytes]:
    """Pieces cut just after a newline, for tokenizers whose merges must not be split mid-line (a piece only
    grows past PIECE_BYTES when a line does)."""
    carry: list[bytes] = []
    for piece in _read_pieces(path):
        cut = piece.rfind(b"\n") + 1
        if cut == 0:
            carry.append(piece)
            continue
        yield b"".join([*carry, piece[:cut]])
        carry = [piece[cut:]]
    if tail := b"".join(carry):
        yield tail


def _token_stream(files: list[Path], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Token ids (int64) of all documents in order, with one EOS between two documents."""
    pieces = _read_pieces if tokenizer.kind == "bytes" else _text_pieces
    for index, path in enumerate(files):
        if index:
            yield np.array([tokenizer.eos_id], np.int64)
        for piece in pieces(path):
            yield tokenizer.encode(piece)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def val_blocks(block_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True for the validation blocks: splitmix64(splitmix64(seed) + i) / 2^64 < fraction (top 53 bits)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed & (2**64 - 1)], np.uint64))[0]
        h = _splitmix64(np.asarray(block_ids).astype(np.uint64) + base)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53) < fraction


@dataclasses.dataclass(frozen=True)
class TokenData:
    train: np.ndarray  # 1-D memmap of token ids (uint16, or uint32 for vocabularies over 65536)
    val: np.ndarray
    tokenizer: Tokenizer
    meta: dict  # fingerprint (files with size and mtime, tokenizer, split settings), train_tokens, val_tokens


def _stat(path: Path) -> dict:
    try:
        st = path.stat()
    except OSError as err:
        raise MesaError(f"cannot read corpus file {path}: {err.strerror or err}") from None
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fingerprint(spec: DataSpec, files: list[Path], tokenizer: Tokenizer) -> dict:
    """Everything the cached tokens depend on; a cache is reused only while this is unchanged."""
    return {"format": FORMAT_VERSION, "files": [_stat(f) for f in files], "tokenizer": tokenizer.kind,
            "tokenizer_file": None if tokenizer.kind == "bytes" else _stat(Path(tokenizer.kind)),
            "vocab_size": tokenizer.vocab_size, "val_fraction": spec.val_fraction, "split_block": spec.split_block,
            "split_seed": spec.split_seed}


def _dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _cached(cache_dir: Path, fingerprint: dict) -> dict | None:
    """The meta.json of a complete cache for ``fingerprint`` (both .bin files of the recorded size), else None."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        itemsize = np.dtype(_dtype(fingerprint["vocab_size"])).itemsize
        complete = all((cache_dir / f"{name}.bin").stat().st_size == meta[f"{name}_tokens"] * itemsize
                       for name in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete and meta.get("fingerprint") == fingerprint else None


def _open(cache_dir: Path, meta: dict, tokenizer: Tokenizer) -> TokenData:
    dtype = _dtype(tokenizer.vocab_size)

    def load(name):
        n = meta[f"{name}_tokens"]
        return np.memmap(cache_dir / f"{name}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)

    return TokenData(load("train"), load("val"), tokenizer, meta)


def _tmp(path: Path) -> Path:
    """A temporary name next to ``path``, private to this process."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def prepare_corpus(spec: DataSpec, cache_dir: Path, progress: Callable[[str], None] | None = None) -> TokenData:
    """Tokenise and split the corpus into cache_dir/{train,val}.bin (reused while the files, tokenizer and
    split settings are unchanged; written under temporary names, meta.json last, so a half-written cache
    is never used)."""
    tokenizer = load_tokenizer(spec.tokenizer)
    files = source_files(spec.path)
    fingerprint = _fingerprint(spec, files, tokenizer)
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "meta.json"
    blocker = next((p for p in (cache_dir, *cache_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise MesaError(f"cannot write the token cache in {cache_dir} (data.cache_dir): {blocker} is a file, "
                        f"not a directory")
    if (meta := _cached(cache_dir, fingerprint)) is not None:
        return _open(cache_dir, meta, tokenizer)
    if all(f["size"] == 0 for f in fingerprint["files"]):
        raise MesaError(f"the corpus is empty: {', '.join(str(f) for f in files[:3])} hold no text")
    if progress:
        megabytes = sum(f["size"] for f in fingerprint["files"]) / 1e6
        what = "the embedded corpus" if files == [EMBEDDED_CORPUS] else (
            f"{len(files)} file{'s' if len(files) > 1 else ''} ({megabytes:.1f} MB)")
        progress(f"tokenising {what} into {cache_dir}")
    tmp = {name: _tmp(cache_dir / f"{name}.bin") for name in SPLITS}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # from here on the old cache is invalid, whatever happens
        counts = _write_split(files, tokenizer, spec, cache_dir, _dtype(tokenizer.vocab_size))
        if counts["train"] + counts["val"] == 0:
            raise MesaError(f"the corpus is empty: {', '.join(str(f) for f in files[:3])} hold no tokens")
        if counts["train"] == 0:
            raise MesaError(f"the corpus is too small to split: {counts['val']} tokens fill only one block of "
                            f"data.split_block {spec.split_block}; use a smaller data.split_block or more text")
        for name in SPLITS:
            tmp[name].replace(cache_dir / f"{name}.bin")
        meta = {"fingerprint": fingerprint, "train_tokens": counts["train"], "val_tokens": counts["val"]}
        tmp_meta = _tmp(meta_path)
        tmp_meta.write_text(json.dumps(meta, indent=1))
        tmp_meta.replace(meta_path)
    except OSError as err:
        raise MesaError(f"cannot write the token cache in {cache_dir}: {err.strerror or err}") from None
    finally:
        for path in tmp.values():
            with contextlib.suppress(OSError):  # never mask the error above with one about a leftover
                path.unlink(missing_ok=True)
    return _open(cache_dir, meta, tokenizer)


def _write_split(files: list[Path], tokenizer: Tokenizer, spec: DataSpec, cache_dir: Path, dtype) -> dict:
    """Stream the tokens into the temporary train/val files, whole blocks at a time, in stream order; returns the
    token counts.  The last block is held back until the stream ends, so that it can go to validation when no
    other block did."""
    block = spec.split_block
    counts, index = {"train": 0, "val": 0}, 0
    with open(_tmp(cache_dir / "train.bin"), "wb") as out_train, open(_tmp(cache_dir / "val.bin"), "wb") as out_val:

        def emit(tokens: np.ndarray, to_val_K: np.ndarray) -> None:
            """Write len(to_val_K) consecutive blocks (the last may be short) to their splits."""
            nonlocal index
            to_val_N = np.repeat(to_val_K, block)[: len(tokens)]
            val, train = tokens[to_val_N], tokens[~to_val_N]
            out_val.write(val.tobytes())
            out_train.write(train.tobytes())
            counts["val"] += len(val)
            counts["train"] += len(train)
            index += len(to_val_K)

        pending = np.zeros(0, dtype)
        for ids in _token_stream(files, tokenizer):
            pending = np.concatenate([pending, ids.astype(dtype)])
            whole = (len(pending) - 1) // block  # blocks that are surely not the last one
            if whole > 0:
                emit(pending[: whole * block], val_blocks(np.arange(index, index + whole), spec.split_seed,
                                                          spec.val_fraction))
                pending = pending[whole * block:]
        if len(pending):
            last_to_val = val_blocks(np.array([index]), spec.split_seed, spec.val_fraction) | (counts["val"] == 0)
            emit(pending, last_to_val)
    return counts


def check_context(data: TokenData, context: int) -> None:
    """Both splits must hold at least one window of context + 1 tokens."""
    need = context + 1
    for name in SPLITS:
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
    """[count', length] int32 windows at evenly spaced starts from the first to the last possible one
    (deterministic; disjoint whenever count * length <= len(tokens)); count' = min(count, possible starts)."""
    last = len(tokens) - length
    if last < 0 or count <= 0:
        return np.zeros((0, length), np.int32)
    starts = np.unique(np.linspace(0, last, num=min(count, last + 1)).round().astype(np.int64))
    return np.stack([np.asarray(tokens[s:s + length]) for s in starts]).astype(np.int32)


def corpus_for(spec, run_dir: Path, progress: Callable[[str], None] | None = None) -> TokenData:
    """The tokens of an LM spec (``LMSpec``): cached under data.cache_dir or RUN_DIR/data, checked against the
    context length."""
    cache = Path(spec.data.cache_dir) if spec.data.cache_dir else run_dir / "data"
    data = prepare_corpus(spec.data, cache, progress)
    check_context(data, spec.model.context)
    return data
