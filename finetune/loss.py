"""Causal-LM loss that never materialises the full fp32 logits.

transformers computes `lm_head(hidden)` for every token, then upcasts the logits to fp32 for the
loss: at batch 16 x 1024 with GPT-2's 50k vocabulary that is 3.3 GB, kept for backward.
`chunked_linear_cross_entropy` fuses the head and the loss instead: it walks the tokens a chunk at
a time, and while the chunk's fp32 logits exist it also computes their gradients, so backward only
scales gradients already computed and the peak memory is one chunk's logits.

`patch_model_for_chunked_loss` makes a GPT-2 / GPT-Neo / GPT-J causal-LM model (PEFT-wrapped or
not) use it whenever `labels` are passed, which is how `transformers.Trainer` trains.
"""

import functools
import importlib.util

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from finetune.vocab import real_vocab_size

# Tokens per chunk. One chunk of GPT-2 fp32 logits is 1024 x 50257 x 4 B = 206 MB; a few such
# buffers live at once. Large enough for the matmuls to run at full speed on a GPU.
DEFAULT_CHUNK_SIZE = 1024


def fused_available() -> bool:
    """Whether Liger's fused linear cross-entropy (a CUDA/Triton kernel) can be used here."""
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def _loss_and_grads(
    hidden, weight, bias, labels, denominator, chunk_size, ignore_index, vocab_size, needs_grad
):
    """Sum of token losses / denominator and, for each input in `needs_grad`, its gradient.

    hidden [N, H], labels [N]; weight [V, H] and bias [V] or None, all of one dtype. Gradients of
    the weight and bias are accumulated in fp32 across chunks.
    """
    need_hidden, need_weight, need_bias = needs_grad
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)

    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        chunk_hidden, chunk_labels = hidden[chunk], labels[chunk]
        logits = nn.functional.linear(chunk_hidden, weight, bias).float()
        if vocab_size < logits.shape[1]:
            logits[:, vocab_size:] = float("-inf")  # padded vocabulary rows predict nothing

        valid = chunk_labels != ignore_index
        targets = torch.where(valid, chunk_labels, 0).unsqueeze(1)
        log_normaliser = torch.logsumexp(logits, dim=1, keepdim=True)
        token_losses = (log_normaliser - logits.gather(1, targets)).squeeze(1)
        total += torch.where(valid, token_losses, 0.0).sum()

        if not any(needs_grad):
            continue
        # d(loss)/d(logits) = (softmax - one_hot(target)) / denominator, zero for ignored tokens.
        grad_logits = logits.sub_(log_normaliser).exp_()
        grad_logits.scatter_add_(1, targets, torch.full_like(targets, -1, dtype=logits.dtype))
        grad_logits.mul_((valid / denominator).unsqueeze(1))
        grad_logits = grad_logits.to(weight.dtype)
        if need_hidden:
            grad_hidden[chunk] = grad_logits @ weight
        if need_weight:
            grad_weight += (grad_logits.T @ chunk_hidden).float()
        if need_bias:
            grad_bias += grad_logits.float().sum(0)

    return total / denominator, grad_hidden, grad_weight, grad_bias


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Gradients are computed in forward, while each chunk's logits exist; backward scales them."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, denominator, chunk_size, ignore_index, vocab_size
    ):
        loss, *grads = _loss_and_grads(
            hidden,
            weight,
            bias,
            labels,
            denominator,
            chunk_size,
            ignore_index,
            vocab_size,
            ctx.needs_input_grad[:3],
        )
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift: bool = True,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `labels`, a chunk of tokens at a time.

    Args:
        hidden: final hidden states [B, T, H] (or [N, H] with `shift=False`).
        weight: the LM head [V, H]; V may exceed `vocab_size` (a padded vocabulary).
        labels: token ids [B, T]; `ignore_index` marks tokens without a loss.
        chunk_size: tokens whose logits are materialised at once.
        bias: the LM head bias [V] (GPT-J has one), or None.
        vocab_size: the real vocabulary; logits of rows beyond it are masked to -inf.
        num_items_in_batch: divide the summed loss by this instead of the number of non-ignored
            tokens, as transformers does to average correctly over gradient accumulation.
        shift: predict `labels[:, t + 1]` from `hidden[:, t]`, as HF causal-LM models do; with
            False, `labels` are already aligned with `hidden` (HF's `shift_labels`).

    Returns:
        The mean loss over non-ignored tokens (0, not NaN, when there are none).
    """
    if shift:
        # Pad-then-slice the labels rather than slice the hidden states: keeps `hidden` a view.
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        denominator = (labels != ignore_index).sum().clamp(min=1)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device)
    denominator = denominator.to(torch.float32)

    # Under autocast, run the head in the autocast dtype as nn.Linear would; the casts stay
    # outside the Function so that autograd returns fp32 gradients to fp32 parameters.
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    args = (
        hidden,
        weight,
        bias,
        labels,
        denominator,
        chunk_size,
        ignore_index,
        vocab_size or weight.shape[0],
    )

    with torch.autocast(device_type, enabled=False):
        needs_grad = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
        if torch.is_grad_enabled() and any(needs_grad):
            return _ChunkedLinearCrossEntropy.apply(*args)
        return _loss_and_grads(*args, needs_grad=(False, False, False))[0]


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper, or the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def patch_model_for_chunked_loss(
    model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE, loss_function=None
):
    """Make a causal-LM model compute its loss with `chunked_linear_cross_entropy`, in place.

    When `labels` are passed, the model runs its base transformer, computes the loss against the
    LM head's weight (and bias) and returns a `CausalLMOutputWithPast` with `logits=None`. Without
    labels (generation, inference) the original forward runs. A PEFT model is patched through
    its underlying transformers model, which PEFT's forward calls. Returns `model`.

    `loss_function` replaces `chunked_linear_cross_entropy` (same arguments), e.g. a fused kernel.

    Evaluation that needs logits (`compute_metrics`) must call the model without labels.
    """
    lm = _causal_lm(model)
    original_forward = getattr(lm, "_forward_before_chunked_loss", lm.forward)

    # `wraps` keeps the original signature visible to `inspect`: Trainer keeps only the dataset
    # columns that the model's forward names (attention_mask, ...).
    @functools.wraps(original_forward)
    def forward(input_ids=None, *args, labels=None, **kwargs):
        head = lm.get_output_embeddings()
        # A head wrapped by PEFT (LoRA on lm_head, modules_to_save) computes more than
        # weight @ hidden: only the original forward is exact then.
        no_labels = labels is None and "shift_labels" not in kwargs
        if no_labels or args or type(head) is not nn.Linear:
            return original_forward(input_ids, *args, labels=labels, **kwargs)

        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        return_dict = kwargs.pop("return_dict", None)
        kwargs.pop("logits_to_keep", None)  # no logits are returned
        outputs = lm.base_model(input_ids, return_dict=True, **kwargs)
        loss = (loss_function or chunked_linear_cross_entropy)(
            outputs.last_hidden_state,
            head.weight,
            labels if shift_labels is None else shift_labels,
            chunk_size=chunk_size,
            bias=head.bias,
            vocab_size=real_vocab_size(lm),
            num_items_in_batch=num_items_in_batch,
            shift=shift_labels is None,
        )
        result = CausalLMOutputWithPast(
            loss=loss,
            cache=outputs.get("cache"),
            hidden_states=outputs.get("hidden_states"),
            attentions=outputs.get("attentions"),
        )
        return result.to_tuple() if return_dict is False else result

    lm._forward_before_chunked_loss = original_forward
    # An instance attribute: nn.Module.__call__ looks `forward` up on the instance, the class
    # (and so every other model, and the state_dict) is untouched.
    lm.forward = forward
    return model
