"""Vocabulary padding: embedding and head rows rounded up to a multiple, the extra logits masked.

GPT-2's 50257 rows are not a multiple of 64, which slows the LM head's matmuls on a GPU: padding
to 50304 gave +5% on GPT-2 124M in a hand-written loop on an H200 (../shared/PERFORMANCE.md).
The padded rows must predict nothing, or the loss and the samples change: a forward hook on the
head sets their logits to -inf (the chunked and fused losses read the real size and slice them
off). Checkpoints keep the padding, since resuming rebuilds the padded model and loads them; the
final model is unpadded, and `config.finetune_vocab_size` lets `unpad` fix a checkpoint loaded
for inference.
"""

from __future__ import annotations

import torch

REAL_SIZE = "finetune_vocab_size"  # a config attribute: the vocabulary before padding


def pad(model, multiple: int) -> int | None:
    """Pad `model`'s embeddings (and its head, tied or not) to a multiple of `multiple` rows,
    in place, and mask the extra logits. Returns the padded size, or None when nothing changed.

    The new rows are drawn with the random state saved and restored, so a padded run draws the
    same dropout masks and data order as an unpadded one.
    """
    real = model.get_input_embeddings().num_embeddings
    if multiple <= 1 or real % multiple == 0:
        return None
    with torch.random.fork_rng(devices=[]):
        model.resize_token_embeddings(real, pad_to_multiple_of=multiple, mean_resizing=False)
    setattr(model.config, REAL_SIZE, real)
    head = model.get_output_embeddings()
    head._finetune_mask = head.register_forward_hook(_mask_padded_logits(real))
    return model.get_input_embeddings().num_embeddings


def real_vocab_size(model) -> int:
    """The vocabulary the loss is over: the real one of a padded model."""
    return getattr(model.config, REAL_SIZE, None) or model.config.vocab_size


def unpad(model) -> None:
    """Drop the padded rows and the mask, in place (a no-op on a model that was never padded)."""
    real = getattr(model.config, REAL_SIZE, None)
    if real is None:
        return
    head = model.get_output_embeddings()
    handle = getattr(head, "_finetune_mask", None)
    if handle is not None:
        handle.remove()
        del head._finetune_mask
    model.resize_token_embeddings(real, mean_resizing=False)
    delattr(model.config, REAL_SIZE)


def _mask_padded_logits(real: int):
    def hook(module, inputs, logits):
        logits[..., real:] = float("-inf")  # in place: the matmul's backward needs no output

    return hook
