"""Token windows: BOS first, packing or not, document ids, seeded order, dataset sources."""

import json
from itertools import islice

import numpy as np
import pytest

import train.data
from train.data import (
    PAD_DOC,
    TextFile,
    clean_markdown,
    load_documents,
    shakespeare_files,
    shuffled,
    token_windows,
)


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def texts(documents) -> list[str]:
    """Each document's whole text, whether it came whole or in pieces."""
    return ["".join(d) for d in documents]


DOCS = [
    "To be, or not to be, that is the question.",
    "Alas, poor Yorick! I knew him, Horatio.",
    "Exit.",
]


def test_packed_windows_are_the_concatenated_documents(tok):
    windows = list(token_windows(tok, enumerate(DOCS), context_size=8, pack=True))
    assert all(w.tokens[0] == tok.bos_token_id and len(w.tokens) == 8 for w in windows)
    stream = np.concatenate([w.tokens[1:] for w in windows])
    expected = sum(
        (tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id] for d in DOCS), []
    )
    assert stream.tolist() == expected[: len(stream)]
    assert len(expected) - len(stream) < 7, "only the last partial window is dropped"
    doc_stream = np.concatenate([w.docs[1:] for w in windows])
    assert (
        doc_stream.tolist()
        == sum(
            (
                [i] * (len(tok(d, add_special_tokens=False).input_ids) + 1)
                for i, d in enumerate(DOCS)
            ),
            [],
        )[: len(doc_stream)]
    )


def test_unpacked_windows_keep_documents_apart_with_padding(tok):
    windows = list(token_windows(tok, enumerate(DOCS), context_size=8, pack=False))
    for w in windows:
        real = w.docs[1:][w.docs[1:] != PAD_DOC]
        assert len(set(real.tolist())) == 1, "one document per window"
        assert (w.docs[1:] == PAD_DOC).tolist() == sorted((w.docs[1:] == PAD_DOC).tolist()), (
            "padding only at the end"
        )
    assert [w.docs[1] for w in windows].count(2) == 1 and (windows[-1].docs == PAD_DOC).sum() > 0


def test_seeded_shuffle_is_deterministic_and_bounded():
    items = list(range(100))
    a = list(shuffled(items, seed=3, buffer=10))
    assert sorted(a) == items and a != items
    assert a == list(shuffled(items, seed=3, buffer=10))
    assert a != list(shuffled(items, seed=4, buffer=10))
    assert max(a[:10]) < 20, "a 10-item buffer cannot reach far ahead"


def test_shakespeare_is_38_plays():
    files = shakespeare_files()
    assert len(files) == 38 and any("hamlet" in f.name for f in files)
    first = next(load_documents("shakespeare"))
    assert "  \n" not in first, "markdown line-break markers are stripped"


def test_local_text_folder_file_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b.md").write_text("second doc")
    assert texts(load_documents(str(tmp_path))) == ["first doc", "second doc"]
    assert texts(load_documents(str(tmp_path / "b.md"))) == ["second doc"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": t}) for t in ["x y", "z"]))
    assert list(load_documents(str(rows), text_column="body")) == ["x y", "z"]
    with pytest.raises(KeyError, match="no column 'text'"):
        list(load_documents(str(rows)))


def test_context_size_too_small(tok):
    with pytest.raises(ValueError, match="context_size must be at least 2"):
        list(token_windows(tok, enumerate(DOCS), context_size=1))


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, layout):
    """A Latin-1 file raised a bare UnicodeDecodeError naming no file."""
    bad = tmp_path / "plays" / "hamlet.txt"
    bad.parent.mkdir()
    bad.write_bytes("To be, or not to be: na\xefve".encode("latin-1"))
    source = bad if layout == "file" else bad.parent
    with pytest.raises(ValueError, match=rf"{bad} is not UTF-8 text \(byte 23: invalid"):
        texts(load_documents(str(source)))


def test_a_large_file_is_read_in_pieces_giving_the_tokens_of_the_whole(tok, tmp_path, monkeypatch):
    """Read whole, a 28 MB file peaked at 4.1 GB in the tokenizer: now a piece at a time, and only
    as far as the windows asked for. The pieces end before a line of text, so the tokens match
    (multi-byte characters cut between blocks and CRLF line ends included)."""
    monkeypatch.setattr(train.data, "PIECE_BYTES", 4096)
    play = clean_markdown(shakespeare_files()[0].read_text())[:60_000] + "\nnaïve café — ✓ 𝄞 end"
    path = tmp_path / "play.txt"
    path.write_bytes(play.replace("\n", "\r\n").encode())
    pieces = list(TextFile(path))
    assert len(pieces) > 10 and "".join(pieces) == play == path.read_text()
    whole = list(token_windows(tok, [(0, play)], context_size=64))
    streamed = list(token_windows(tok, [(0, TextFile(path))], context_size=64))
    assert [w.tokens.tolist() for w in streamed] == [w.tokens.tolist() for w in whole]

    class Spy:
        """The tokenizer, noting how many characters each call is given."""

        def __init__(self):
            self.sizes = []

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kwargs):
            self.sizes.append(len(text))
            return tok(text, **kwargs)

    spy = Spy()
    big = tmp_path / "big.txt"
    big.write_text(play * 80)  # ~5 MB
    windows = token_windows(spy, [(0, TextFile(big))], context_size=32)
    assert len(list(islice(windows, 100))) == 100
    assert max(spy.sizes) < 4096 + 200 and sum(spy.sizes) < 3 * 4096
    (tmp_path / "no-spaces.txt").write_text("x" * 50_000)
    pieces = list(TextFile(tmp_path / "no-spaces.txt"))
    assert "".join(pieces) == "x" * 50_000 and max(map(len, pieces)) <= 5 * 4096


def test_a_bad_byte_past_the_first_piece_is_named_at_its_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(train.data, "PIECE_BYTES", 100)
    path = tmp_path / "notes.txt"
    path.write_bytes(("é line\n" * 50).encode() + b"\xff")
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text \(byte 400: invalid start"):
        list(TextFile(path))
