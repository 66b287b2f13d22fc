"""The fast paths, as the recipe's `speed:` block and `data.packing` ask.

- attention: GPT-Neo through SDPA (finetune.neo_attention; transformers has only eager for it);
  GPT-2 and GPT-J use transformers' own SDPA. `speed.attention=eager` restores the reference.
- loss: transformers' standard loss, the chunked linear cross-entropy (finetune.loss) or Liger's
  fused kernel. At GPT-2 124M on an H200 the fused loss cost speed (214k vs 340k tokens/s,
  ../shared/PERFORMANCE.md) and bought only memory, so `auto` keeps the standard loss except for
  LoRA on a GPU, where the models are large and memory is the limit.
- vocabulary padding: embedding and head rows rounded up to a multiple of 64 (finetune.vocab),
  their logits masked; the saved model is unpadded.
- GPU training defaults that fill only what `training:` leaves unset.
- Training and evaluation calls (with labels) run without a KV cache: nothing reads it, and
  transformers only builds the block-diagonal mask of packed documents when there is none.
"""

from __future__ import annotations

import functools
import os

from finetune import vocab
from finetune.config import Recipe
from finetune.errors import FinetuneError


def check(recipe: Recipe, cuda: bool | None = None) -> None:
    """Refuse settings this machine cannot honour, before any data is prepared."""
    cuda = _cuda() if cuda is None else cuda
    if recipe.speed.loss == "fused" and not _fused_available(cuda):
        raise FinetuneError(
            "speed.loss=fused needs a CUDA GPU and liger-kernel (pip install 'finetune[gpu]'); "
            "use speed.loss=chunked, which works everywhere"
        )
    pad = recipe.speed.pad_vocab
    if pad != "auto" and pad < 1:
        raise FinetuneError(
            f"speed.pad_vocab: expected auto or a positive integer, got {pad} (1 turns it off)"
        )
    if pad != "auto" and pad > 1 and recipe.lora.enabled:
        raise FinetuneError(
            "speed.pad_vocab pads trained embeddings; with LoRA they are frozen: remove it"
        )
    if pad != "auto" and pad > 1 and _sharded(recipe):
        raise FinetuneError(
            "speed.pad_vocab cannot unpad sharded (FSDP, DeepSpeed) embeddings at save: remove it"
        )
    if recipe.model.quantization:
        from finetune.quantize import check_available

        check_available(recipe.model.quantization, cuda)


def loss_kind(recipe: Recipe, cuda: bool | None = None) -> str:
    """standard | chunked | fused: what `speed.loss` means on this machine."""
    cuda = _cuda() if cuda is None else cuda
    if recipe.speed.loss != "auto":
        return recipe.speed.loss
    if cuda and recipe.lora.enabled:
        return "fused" if _fused_available(cuda) else "chunked"
    return "standard"


def pad_vocab_multiple(recipe: Recipe, model_type: str, cuda: bool | None = None) -> int:
    """What `speed.pad_vocab` means for this model on this machine: 1 is no padding."""
    if recipe.speed.pad_vocab != "auto":
        return recipe.speed.pad_vocab
    cuda = _cuda() if cuda is None else cuda
    full = not recipe.lora.enabled and not _sharded(recipe)
    return 64 if cuda and full and model_type in ("gpt2", "gpt_neo") else 1


def apply(model, recipe: Recipe, log=print):
    """Switch the model (PEFT-wrapped or not) to the fast paths, in place; returns it."""
    from finetune.loss import patch_model_for_chunked_loss
    from finetune.neo_attention import enable_sdpa
    from finetune.packing import check_model

    if recipe.speed.attention == "eager":
        _causal_lm(model).set_attn_implementation("eager")
    elif enable_sdpa(model):
        log("attention: GPT-Neo through SDPA (exact: unscaled scores, local window)")
    check_model(_causal_lm(model), recipe.data)

    lm = _causal_lm(model)
    padded = vocab.pad(lm, pad_vocab_multiple(recipe, lm.config.model_type))
    if padded:
        log(f"vocabulary: padded to {padded} rows, the extra logits masked")

    kind = loss_kind(recipe)
    if kind == "chunked":
        patch_model_for_chunked_loss(model)
    elif kind == "fused":
        patch_model_for_chunked_loss(model, loss_function=fused_linear_cross_entropy)
    if kind != "standard":
        log(f"loss: {kind} linear cross-entropy (no full fp32 logits)")
    _no_cache_with_labels(model)
    return model


def training_defaults(recipe: Recipe, values: dict, device: dict | None = None) -> dict:
    """`training:` values with fast GPU settings added where unset (a copy).

    `device` describes the machine: {"cuda": bool, "capability": (major, minor), "family": str};
    measured here when None.
    """
    device = _device(recipe) if device is None else device
    if not recipe.speed.gpu_defaults or not device["cuda"]:
        return dict(values)
    out = dict(values)
    if device["capability"] >= (8, 0):
        out.setdefault("tf32", True)
    out.setdefault("optim", "adamw_torch_fused")
    out.setdefault("dataloader_num_workers", min(4, os.cpu_count() or 1))
    if out["dataloader_num_workers"]:
        out.setdefault("dataloader_persistent_workers", True)
    out.setdefault("dataloader_pin_memory", True)
    # Measured on GPT-2 124M (PERFORMANCE.md: 143k -> 323k tokens/s with fused AdamW). Not yet
    # measured for GPT-Neo's SDPA patch, GPT-J, LoRA, quantized bases or packed documents.
    if (
        device["family"] == "gpt2"
        and not recipe.lora.enabled
        and recipe.data.packing == "concat"
        and loss_kind(recipe, cuda=True) == "standard"
    ):
        out.setdefault("torch_compile", True)
    return out


def trainer_class():
    """`transformers.Trainer`, counting trained tokens on the host.

    Trainer's own count (`include_num_input_tokens_seen`) reads a number back from the GPU after
    every micro-batch's backward (`.item()`), so the GPU runs dry while the host waits and then
    launches the optimizer step and the next forward. A batch's token count is its shape, known on
    the host; every process trains a batch of the same shape (accelerate evens the last one out),
    hence the factor world_size. The count lives in `state.num_input_tokens_seen`, so checkpoints
    keep it and a resumed run goes on from it. Trainer counts itself when a recipe sets
    `training.include_num_input_tokens_seen`.
    """
    from transformers import Trainer

    class HostCountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.args.include_num_input_tokens_seen in ("no", False, None):
                count = inputs[getattr(self.model, "main_input_name", "input_ids")].numel()
                self.state.num_input_tokens_seen += count * self.args.world_size
            return super().training_step(model, inputs, num_items_in_batch)

    return HostCountingTrainer


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    chunk_size=None,
    ignore_index=-100,
    bias=None,
    vocab_size=None,
    num_items_in_batch=None,
    shift=True,
):
    """Liger's fused linear cross-entropy, with `chunked_linear_cross_entropy`'s arguments.

    `chunk_size` is unused (the kernel picks its own). CUDA only; needs liger-kernel.
    """
    import torch
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    if shift:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]  # padded vocabulary rows predict nothing
        bias = bias[:vocab_size] if bias is not None else None
    if num_items_in_batch is None:
        denominator = (labels != ignore_index).sum().clamp(min=1)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device)
    device_type = hidden.device.type
    dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else weight.dtype
    )
    # fp32 gradient accumulators for the head, as the chunked loss keeps (Liger's default is the
    # weight's dtype, bf16 here, which matters when the head trains).
    loss_sum = LigerFusedLinearCrossEntropyLoss(
        ignore_index=ignore_index, reduction="sum", accum_dtype=torch.float32
    )
    with torch.autocast(device_type, enabled=False):
        total = loss_sum(
            weight.to(dtype), hidden.to(dtype), labels, bias.to(dtype) if bias is not None else None
        )
    return total.float() / denominator.float()


# --------------------------------------------------------------------------- helpers


def _no_cache_with_labels(model) -> None:
    lm = _causal_lm(model)
    inner = lm.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None:
            kwargs.setdefault("use_cache", False)
        return inner(*args, **kwargs)

    lm.forward = forward  # an instance attribute, as finetune.loss does


def _causal_lm(model):
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _sharded(recipe: Recipe) -> bool:
    """FSDP or DeepSpeed, asked by the recipe or by `accelerate launch --config_file`."""
    launcher = any(
        os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true")
        for name in ("FSDP", "DEEPSPEED")
    )
    return launcher or bool(recipe.training.get("fsdp") or recipe.training.get("deepspeed"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fused_available(cuda: bool) -> bool:
    from finetune.loss import fused_available

    return cuda and fused_available()


def _device(recipe: Recipe) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "capability": (0, 0), "family": None}
    if recipe.model.architecture:
        family = recipe.model.architecture
    else:
        from finetune.model import resolve_config

        family = resolve_config(recipe.model).model_type
    return {"cuda": True, "capability": torch.cuda.get_device_capability(), "family": family}
