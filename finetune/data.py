"""From documents to training blocks: tokenize, join with end-of-text, cut into blocks, cache.

Documents are joined with the tokenizer's end-of-text token so the model learns where a text ends,
then cut into `block_size` blocks (the remainder is dropped, as run_clm does, so no block is padded
and every token in a block counts in the loss). Tokenized corpora are cached as flat arrays keyed
by the tokenizer, the corpus bytes and the settings; a second run on an unchanged corpus only
hashes the files and memory-maps the arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from finetune import corpus
from finetune.config import DataSpec
from finetune.errors import FinetuneError

CACHE_VERSION = "1"
# A newline followed by a non-space character is always a pre-token boundary for byte-level BPE,
# so text cut there tokenizes exactly like the whole (see tests/test_data.py); cutting lets the
# tokenizer's Rust batch encoder spread one large document over all cores.
_CUT = re.compile(r"\n(?=\S)")
_PIECE_CHARS = 4096


def cache_root(data: DataSpec) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir)
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune"


@dataclass
class TokenizedSplit:
    """One split as a flat token array (documents joined with end-of-text) and document lengths."""

    tokens: np.ndarray
    doc_lengths: np.ndarray
    characters: int

    def blocks(self, block_size: int) -> np.ndarray:
        n = len(self.tokens) // block_size
        return self.tokens[: n * block_size].reshape(n, block_size)

    @property
    def documents(self) -> int:
        return len(self.doc_lengths)


@dataclass
class PreparedData:
    train: TokenizedSplit
    validation: TokenizedSplit
    cache_path: Path
    from_cache: bool

    def stats(self, block_size: int) -> dict:
        out = {}
        for name in ("train", "validation"):
            split: TokenizedSplit = getattr(self, name)
            out[name] = {
                "documents": split.documents,
                "characters": split.characters,
                "tokens": int(len(split.tokens)),
                "blocks": int(len(split.tokens) // block_size),
            }
        return out


class BlockDataset:
    """Blocks of token ids; labels are the inputs (the model shifts them), nothing is padded.

    A map-style dataset (`DataLoader` needs only `__len__` and `__getitem__`); torch is imported
    on first use, so reading the cache (`finetune prepare`) does not pay for it.
    """

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        import torch

        ids = torch.from_numpy(self.blocks[index].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


# --------------------------------------------------------------------------- tokenizing


def tokenize_documents(tokenizer, documents: list[str], progress: bool = True) -> list[np.ndarray]:
    """Token ids of each document, end-of-text appended; large documents encoded in parallel."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    if eos is None:
        raise FinetuneError("the tokenizer has no end-of-text token; set tokenizer.name to one")
    pieces, owners = [], []
    for index, text in enumerate(documents):
        for piece in _split_for_parallelism(tokenizer, text):
            pieces.append(piece)
            owners.append(index)
    ids: list[list[int]] = []
    batch = 2048
    with tqdm(
        total=len(pieces),
        desc="tokenizing",
        unit="piece",
        disable=not progress,
        leave=False,
        delay=1.0,
    ) as bar:  # no bar for corpora tokenized in a blink
        for start in range(0, len(pieces), batch):
            chunk = pieces[start : start + batch]
            ids.extend(
                e.ids
                for e in _encode_batch(tokenizer.backend_tokenizer)(chunk, add_special_tokens=False)
            )
            bar.update(len(chunk))
    per_doc: list[list[list[int]]] = [[] for _ in documents]
    for owner, piece_ids in zip(owners, ids, strict=True):
        per_doc[owner].append(piece_ids)
    out = []
    for parts in per_doc:
        flat = np.fromiter(chain.from_iterable(parts), dtype=np.int32)
        out.append(np.append(flat, np.int32(eos)))
    return out


def _encode_batch(backend):
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never read.
    return getattr(backend, "encode_batch_fast", backend.encode_batch)


def _split_for_parallelism(tokenizer, text: str) -> list[str]:
    if not _cuts_are_exact(tokenizer) or len(text) <= _PIECE_CHARS:
        return [text]
    pieces, start = [], 0
    for match in _CUT.finditer(text):
        end = match.end()
        if end - start >= _PIECE_CHARS:
            pieces.append(text[start:end])
            start = end
    pieces.append(text[start:])
    return pieces


def _cuts_are_exact(tokenizer) -> bool:
    """True for byte-level BPE without a prefix space (GPT-2, GPT-Neo, GPT-J, trained ones)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return False
    state = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    return (
        state.get("type") == "ByteLevel"
        and not state.get("add_prefix_space")
        and state.get("use_regex", True)
    )


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


# --------------------------------------------------------------------------- preparing


def prepare(data: DataSpec, tokenizer, seed: int, progress: bool = True) -> PreparedData:
    """Tokenized train and validation splits, from the cache when the inputs are unchanged."""
    train_source = corpus.resolve(data.train, "data.train")
    val_source = corpus.resolve(data.validation, "data.validation") if data.validation else None
    key_material = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "train": train_source.fingerprint(),
        "validation": val_source.fingerprint() if val_source else None,
        "validation_split": None if val_source else data.validation_split,
        "seed": None if val_source else seed,
        "text_column": data.text_column,
        "encoding": data.encoding,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root(data) / "tokenized" / key
    if (path / "meta.json").is_file():
        return PreparedData(_load_split(path, "train"), _load_split(path, "validation"), path, True)

    train_docs = corpus.read_documents(train_source, data.text_column, data.encoding)
    if val_source:
        val_docs = corpus.read_documents(val_source, data.text_column, data.encoding)
        train = _split_of(tokenize_documents(tokenizer, train_docs, progress), train_docs)
        validation = _split_of(tokenize_documents(tokenizer, val_docs, progress), val_docs)
    else:
        train, validation = _hold_out(tokenizer, train_docs, data.validation_split, seed, progress)
    _save(path, {"train": train, "validation": validation}, key_material)
    return PreparedData(train, validation, path, False)


def _split_of(token_docs: list[np.ndarray], docs: list[str]) -> TokenizedSplit:
    tokens = np.concatenate(token_docs) if token_docs else np.zeros(0, np.int32)
    lengths = np.array([len(t) for t in token_docs], dtype=np.int64)
    return TokenizedSplit(tokens, lengths, sum(len(d) for d in docs))


def _hold_out(tokenizer, docs: list[str], fraction: float, seed: int, progress: bool):
    """Hold out a fraction of documents (by seed); a single document gives up its last tokens."""
    token_docs = tokenize_documents(tokenizer, docs, progress)
    if len(docs) >= 2:
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_val = min(len(docs) - 1, max(1, round(fraction * len(docs))))
        val_ids = sorted(order[:n_val])
        train_ids = sorted(order[n_val:])
        pick = lambda ids: _split_of([token_docs[i] for i in ids], [docs[i] for i in ids])  # noqa: E731
        return pick(train_ids), pick(val_ids)
    tokens = token_docs[0]
    cut = len(tokens) - max(1, round(fraction * len(tokens)))
    chars = len(docs[0])
    train = TokenizedSplit(tokens[:cut], np.array([cut]), round(chars * cut / len(tokens)))
    validation = TokenizedSplit(
        tokens[cut:], np.array([len(tokens) - cut]), chars - train.characters
    )
    return train, validation


def _save(path: Path, splits: dict[str, TokenizedSplit], key_material: dict) -> None:
    """Write the cache entry into a temporary folder, then rename it into place (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        meta = {"key": key_material}
        for name, split in splits.items():
            np.save(tmp / f"{name}.npy", split.tokens)
            np.save(tmp / f"{name}_docs.npy", split.doc_lengths)
            meta[name] = {"characters": split.characters}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_split(path: Path, name: str) -> TokenizedSplit:
    meta = json.loads((path / "meta.json").read_text())
    return TokenizedSplit(
        np.load(path / f"{name}.npy", mmap_mode="r"),
        np.load(path / f"{name}_docs.npy"),
        meta[name]["characters"],
    )


def check_blocks(prepared: PreparedData, block_size: int, split_fraction: bool = False) -> None:
    """Both splits must hold at least one full block, or the run would train or judge nothing."""
    for name, setting in (("train", "data.train"), ("validation", "data.validation")):
        split: TokenizedSplit = getattr(prepared, name)
        if len(split.tokens) < block_size:
            raise FinetuneError(
                f"the {name} set has {len(split.tokens)} tokens, less than one block of "
                f"{block_size}: lower data.block_size, or give {setting} more text"
                + (
                    " (or raise data.validation_split)"
                    if name == "validation" and split_fraction
                    else ""
                )
            )
