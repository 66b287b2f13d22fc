"""Training blocks from a tokenized split, packed as `data.packing` says.

concat: documents joined with end-of-text and cut into blocks (what run_clm does); a token may
attend to the end of the previous document.

documents: the same blocks, plus `position_ids` that restart at 0 where each document starts.
transformers reads restarting position ids (with no attention mask and no cache) as packed
sequences and builds a block-diagonal causal mask from them (`find_packed_sequence_indices` in
`transformers.masking_utils`), so no token attends across a document boundary; GPT-Neo's SDPA
patch takes the same mask. The first token of each joined document gets no label: predicting it
from the end of an unrelated document would teach nothing. A block that starts inside a document
restarts its positions too, as concat blocks do.
"""

from __future__ import annotations

import numpy as np

from finetune.config import DataSpec
from finetune.errors import FinetuneError

IGNORE_INDEX = -100  # labels the loss skips (PyTorch's and transformers' convention)
# Attention implementations whose masks were checked to keep packed documents apart
# (tests/test_packing.py). Flash and flex attention take other paths: refused until checked.
PACKING_ATTENTION = ("sdpa", "eager", "gpt_neo_sdpa")


def block_dataset(split, data: DataSpec):
    """The Dataset of a split's blocks, for `data.packing`."""
    from finetune.data import BlockDataset

    blocks = split.blocks(data.block_size)
    if data.packing == "documents":
        return DocumentBlockDataset(blocks, split.doc_lengths)
    return BlockDataset(blocks)


def check_model(model, data: DataSpec) -> None:
    """Refuse `data.packing=documents` for a model whose attention would let documents mix."""
    if data.packing != "documents":
        return
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation not in PACKING_ATTENTION:
        raise FinetuneError(
            f"data.packing=documents is not supported with {implementation!r} attention "
            f"({model.config.model_type}): use speed.attention=sdpa or data.packing=concat"
        )


def document_starts(doc_lengths: np.ndarray) -> np.ndarray:
    """Offsets in the flat token array at which each document begins."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths


def positions_and_labels(
    ids: np.ndarray, block_start: int, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Position ids restarting at each document start inside the block, and the labels."""
    size = len(ids)
    first = np.searchsorted(starts, block_start, side="right")
    last = np.searchsorted(starts, block_start + size, side="left")
    inside = starts[first:last] - block_start  # document starts after the block's first token
    segment = np.zeros(size, dtype=np.int64)
    segment[inside] = inside
    segment = np.maximum.accumulate(segment)
    positions = np.arange(size, dtype=np.int64) - segment
    labels = ids.astype(np.int64)
    labels[inside] = IGNORE_INDEX
    return positions, labels


class DocumentBlockDataset:
    """Blocks with `position_ids` restarting per document (see the module docstring).

    A map-style dataset: `torch.utils.data.DataLoader` needs only `__len__` and `__getitem__`.
    """

    def __init__(self, blocks: np.ndarray, doc_lengths: np.ndarray):
        self.blocks = blocks
        self.starts = document_starts(doc_lengths)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        import torch

        ids = np.asarray(self.blocks[index])
        positions, labels = positions_and_labels(ids, index * ids.shape[0], self.starts)
        return {
            "input_ids": torch.from_numpy(ids.astype(np.int64)),
            "position_ids": torch.from_numpy(positions),
            "labels": torch.from_numpy(labels),
        }
