"""Token windows: BOS first, packing or not, document ids, seeded order, dataset sources."""

import json

import numpy as np
import pytest

from train.data import PAD_DOC, load_documents, shakespeare_files, shuffled, token_windows


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


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
    assert list(load_documents(str(tmp_path))) == ["first doc", "second doc"]
    assert list(load_documents(str(tmp_path / "b.md"))) == ["second doc"]
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
        list(load_documents(str(source)))
