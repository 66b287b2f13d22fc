"""Document-aware packing: position ids restart per document and documents never see each other."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finetune.config import DataSpec, build_recipe
from finetune.data import TokenizedSplit
from finetune.errors import FinetuneError
from finetune.fast import apply
from finetune.packing import (
    IGNORE_INDEX,
    DocumentBlockDataset,
    block_dataset,
    check_model,
    positions_and_labels,
)

from .conftest import build_tiny_model

BLOCK = 32
# Two blocks: the first holds documents 0 and 1 and the start of 2; the second the rest of 2 and 3.
DOC_LENGTHS = [13, 11, 20, 20]
VOCAB = 128
NO_DROPOUT = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "gptj": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    # A window shorter than the documents, so that the local layer differs from a global one.
    "gpt_neo": {
        "embed_dropout": 0.0,
        "attention_dropout": 0.0,
        "resid_dropout": 0.0,
        "window_size": 8,
    },
}


def _recipe(family: str, **speed) -> object:
    return build_recipe(
        {
            "model": {"architecture": family},
            "data": {"train": "x.txt", "packing": "documents", "block_size": BLOCK},
            "speed": speed,
        },
        check_training=False,
    )


def _segments(block_index: int) -> list[tuple[int, int]]:
    """(start, end) of each document's part inside a block, relative to the block."""
    bounds = np.concatenate([[0], np.cumsum(DOC_LENGTHS)])
    lo, hi = block_index * BLOCK, (block_index + 1) * BLOCK
    return [
        (max(a, lo) - lo, min(b, hi) - lo)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        if a < hi and b > lo
    ]


def test_positions_restart_and_first_tokens_of_joined_documents_are_not_predicted():
    ids = np.arange(100, 100 + BLOCK)
    starts = np.array([0, 13, 24, 44])
    positions, labels = positions_and_labels(ids, 0, starts)
    assert positions.tolist() == [*range(13), *range(11), *range(8)]
    assert (labels[[13, 24]] == IGNORE_INDEX).all()
    assert (np.delete(labels, [13, 24]) == np.delete(ids, [13, 24])).all()
    # The second block starts inside document 2: its positions restart at the block start.
    positions, labels = positions_and_labels(ids, BLOCK, starts)
    assert positions.tolist() == [*range(12), *range(20)]
    assert labels[12] == IGNORE_INDEX and labels[0] == ids[0]


@pytest.mark.parametrize(
    "family, attention",
    [
        ("gpt2", "sdpa"),
        ("gpt2", "eager"),
        ("gptj", "sdpa"),
        ("gpt_neo", "sdpa"),
        ("gpt_neo", "eager"),
    ],
)
def test_a_document_inside_a_packed_row_has_its_logits_alone(family, attention):
    torch.manual_seed(0)
    model = build_tiny_model(family, vocab_size=VOCAB, **NO_DROPOUT[family])
    model = apply(model, _recipe(family, attention=attention), log=lambda m: None)
    tokens = torch.randint(
        0, VOCAB, (sum(DOC_LENGTHS),), generator=torch.Generator().manual_seed(1)
    )
    split = TokenizedSplit(tokens.numpy().astype(np.int32), np.array(DOC_LENGTHS), 0)
    dataset = block_dataset(split, DataSpec(train="x", block_size=BLOCK, packing="documents"))
    assert isinstance(dataset, DocumentBlockDataset) and len(dataset) == 2

    model.train()  # as Trainer calls it: with labels, so without a cache (dropout is off)
    for index in range(len(dataset)):
        batch = {k: v.unsqueeze(0) for k, v in dataset[index].items()}
        with torch.no_grad():
            packed = model(**batch).logits[0]
            concatenated = model(batch["input_ids"], labels=batch["labels"]).logits[0]
        for start, end in _segments(index):
            with torch.no_grad():
                alone = model(batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)
        # Guards the test: without the restarting positions, later documents see earlier ones.
        later = _segments(index)[-1]
        assert not torch.allclose(
            concatenated[later[0] : later[1]], packed[later[0] : later[1]], atol=1e-3
        )


def test_concat_packing_keeps_plain_blocks():
    split = TokenizedSplit(np.arange(64, dtype=np.int32), np.array([64]), 0)
    item = block_dataset(split, DataSpec(train="x", block_size=BLOCK))[1]
    assert set(item) == {"input_ids", "labels"} and item["input_ids"][0] == BLOCK


def test_attention_that_was_not_checked_is_refused():
    model = SimpleNamespace(
        config=SimpleNamespace(_attn_implementation="flash_attention_2", model_type="gpt2")
    )
    with pytest.raises(
        FinetuneError,
        match="data.packing=documents is not supported with 'flash_attention_2' attention",
    ):
        check_model(model, DataSpec(train="x", packing="documents"))
    check_model(model, DataSpec(train="x", packing="concat"))  # concat needs nothing


def test_packing_setting_is_validated():
    with pytest.raises(FinetuneError, match="data.packing: expected one of 'concat', 'documents'"):
        build_recipe(
            {"model": {"architecture": "gpt2"}, "data": {"train": "x", "packing": "docs"}},
            check_training=False,
        )
