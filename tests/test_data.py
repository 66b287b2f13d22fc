"""Corpora of every format, their errors, tokenization, splits and the cache."""

import json

import numpy as np
import pytest

from finetune import corpus
from finetune.config import DataSpec
from finetune.data import BlockDataset, check_blocks, prepare, tokenize_documents
from finetune.errors import FinetuneError

from .conftest import SAMPLE

DOCS = ["First document.\nMaya: hello there", "Second one, with more words in it.", "Third!"]


def _read(spec, text_column="text", encoding="utf-8"):
    return corpus.read_documents(corpus.resolve(str(spec), "data.train"), text_column, encoding)


def test_every_format_reads_one_document_per_file_or_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text(DOCS[0])
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"{i}.md").write_text(doc)
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d, "n": 1}) for d in DOCS))
    (tmp_path / "d.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    (tmp_path / "d.csv").write_text(
        "id,text\n" + "\n".join(f'{i},"{d}"' for i, d in enumerate(DOCS))
    )
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet")

    assert _read(tmp_path / "a.txt") == [DOCS[0]]
    assert _read(folder) == DOCS
    assert _read(tmp_path / "folder" / "*.md") == DOCS
    assert _read(tmp_path / "d.jsonl") == DOCS
    assert _read(tmp_path / "d.json", text_column="body") == DOCS
    assert _read(tmp_path / "d.csv") == DOCS
    assert _read(tmp_path / "d.parquet") == DOCS


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b"  \n\t\n", "is empty"),
        ("binary.txt", b"abc\x00def", "binary (NUL byte at byte offset 3)"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), "not valid utf-8 at byte offset 3"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
        ("cols.jsonl", b'{"body": "a"}\n', "no column 'text' (columns present: body)"),
        ("cols.csv", b"body,id\nx,1\n", "no column 'text' (columns present: body, id)"),
        ("data.xml", b"<a/>", "unsupported file type .xml"),
    ],
)
def test_bad_corpora_name_the_file_and_the_fix(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FinetuneError) as info:
        _read(path)
    assert fragment in str(info.value)
    assert "data.train" in str(info.value)


def test_latin1_corpus_reads_with_data_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    assert _read(path, encoding="latin-1") == ["caf\u00e9"]


def test_missing_corpus_and_empty_glob(tmp_path):
    with pytest.raises(FinetuneError, match="file not found"):
        corpus.resolve(str(tmp_path / "nope.txt"), "data.train")
    with pytest.raises(FinetuneError, match="matches no file"):
        corpus.resolve(str(tmp_path / "*.txt"), "data.validation")


def test_parallel_tokenization_equals_whole_text(tokenizer):
    text = SAMPLE.read_text() * 3  # long enough to be cut into many pieces
    (ids,) = tokenize_documents(tokenizer, [text], progress=False)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:-1].tolist() == whole
    assert ids[-1] == tokenizer.eos_token_id


def test_documents_are_joined_with_end_of_text_which_stays_in_the_labels(tokenizer):
    token_docs = tokenize_documents(tokenizer, DOCS, progress=False)
    eos = tokenizer.eos_token_id
    assert all(doc[-1] == eos for doc in token_docs)
    flat = np.concatenate(token_docs)
    item = BlockDataset(flat[: len(flat) // 8 * 8].reshape(-1, 8))[0]
    assert item["labels"].tolist() == item["input_ids"].tolist()
    assert (np.concatenate(token_docs) == eos).sum() == len(DOCS)
    assert tokenizer.pad_token_id == eos  # padding reuses end-of-text; labels never mask it


def _spec(tmp_path, **kw):
    return DataSpec(**{"cache_dir": str(tmp_path / "cache"), **kw})


def test_validation_split_is_by_document_and_deterministic(tmp_path, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i:02}.txt").write_text(f"Document {i}. " + "words " * (i + 5))
    spec = _spec(tmp_path, train=str(folder), validation_split=0.2)
    first = prepare(spec, tokenizer, seed=1, progress=False)
    again = prepare(
        _spec(tmp_path / "other", train=str(folder), validation_split=0.2),
        tokenizer,
        seed=1,
        progress=False,
    )
    other_seed = prepare(spec, tokenizer, seed=2, progress=False)
    assert first.train.documents == 16 and first.validation.documents == 4
    assert np.array_equal(first.validation.tokens, again.validation.tokens)
    assert not np.array_equal(first.validation.tokens, other_seed.validation.tokens)


def test_single_document_holds_out_its_tail(tmp_path, tokenizer):
    spec = _spec(tmp_path, train=str(SAMPLE), validation_split=0.1)
    prepared = prepare(spec, tokenizer, seed=0, progress=False)
    total = len(prepared.train.tokens) + len(prepared.validation.tokens)
    assert abs(len(prepared.validation.tokens) - 0.1 * total) <= 1
    assert prepared.validation.tokens[-1] == tokenizer.eos_token_id


def test_cache_is_reused_and_keyed_by_content(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text(SAMPLE.read_text())
    spec = _spec(tmp_path, train=str(path))
    assert not prepare(spec, tokenizer, 0, progress=False).from_cache
    cached = prepare(spec, tokenizer, 0, progress=False)
    assert cached.from_cache
    path.write_text(SAMPLE.read_text() + "\nMaya: one more line.")
    changed = prepare(spec, tokenizer, 0, progress=False)
    assert not changed.from_cache
    assert len(changed.train.tokens) > len(cached.train.tokens)


def test_a_set_smaller_than_one_block_is_an_error(tmp_path, tokenizer):
    train, val = tmp_path / "t.txt", tmp_path / "v.txt"
    train.write_text(SAMPLE.read_text())
    val.write_text("Maya: short.")
    prepared = prepare(
        _spec(tmp_path, train=str(train), validation=str(val)), tokenizer, 0, progress=False
    )
    with pytest.raises(FinetuneError, match="validation set has .* less than one block of 64"):
        check_blocks(prepared, 64)
    assert prepared.train.blocks(64).shape[1] == 64
