"""The chunked loss must equal cross-entropy on full logits, in value and gradients (fp32, CPU)."""

import copy
import inspect

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

from finetune.loss import (
    chunked_linear_cross_entropy,
    fused_available,
    patch_model_for_chunked_loss,
)

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
VOCAB = 128


def reference_loss(hidden, weight, labels, bias=None, vocab_size=None, num_items_in_batch=None):
    """What transformers' ForCausalLMLoss computes from full fp32 logits."""
    logits = nn.functional.linear(hidden, weight, bias)[..., :vocab_size].float()
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    return nn.functional.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


def leaf_inputs(vocab_rows=VOCAB, batch=3, length=11, hidden_size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=generator).requires_grad_()
    weight = torch.randn(vocab_rows, hidden_size, generator=generator).requires_grad_()
    bias = torch.randn(vocab_rows, generator=generator).requires_grad_()
    labels = torch.randint(0, VOCAB, (batch, length), generator=generator)
    labels[0, 3:6] = -100
    labels[2, -4:] = -100
    return hidden, weight, bias, labels


def assert_all_close(actual_tensors, expected_tensors):
    for actual, expected in zip(actual_tensors, expected_tensors, strict=True):
        torch.testing.assert_close(actual, expected, **TOLERANCE)


def loss_and_grads(loss_fn, hidden, weight, bias, labels, **kwargs):
    inputs = (hidden, weight, bias)
    loss = loss_fn(hidden, weight, labels, bias=bias, **kwargs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


# 3 x 11 = 33 tokens: chunks of 7 leave a partial last chunk, 1 and 64 are the extremes.
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_matches_full_cross_entropy(chunk_size):
    hidden, weight, bias, labels = leaf_inputs()
    expected, expected_grads = loss_and_grads(reference_loss, hidden, weight, bias, labels)
    actual, actual_grads = loss_and_grads(
        chunked_linear_cross_entropy, hidden, weight, bias, labels, chunk_size=chunk_size
    )
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert_all_close(actual_grads, expected_grads)


def test_without_bias():
    hidden, weight, _, labels = leaf_inputs()
    expected = reference_loss(hidden, weight, labels)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    actual = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=5)
    actual_grads = torch.autograd.grad(actual, (hidden, weight))
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert_all_close(actual_grads, expected_grads)


def test_padded_vocabulary_is_masked():
    """Rows beyond vocab_size get no probability and no gradient."""
    hidden, weight, bias, labels = leaf_inputs(vocab_rows=VOCAB + 64)
    expected, expected_grads = loss_and_grads(
        reference_loss, hidden, weight, bias, labels, vocab_size=VOCAB
    )
    actual, actual_grads = loss_and_grads(
        chunked_linear_cross_entropy, hidden, weight, bias, labels, vocab_size=VOCAB, chunk_size=8
    )
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert_all_close(actual_grads, expected_grads)
    assert not actual_grads[1][VOCAB:].any() and not actual_grads[2][VOCAB:].any()


def test_num_items_in_batch_divides_the_sum():
    hidden, weight, bias, labels = leaf_inputs()
    expected, expected_grads = loss_and_grads(
        reference_loss, hidden, weight, bias, labels, num_items_in_batch=50
    )
    actual, actual_grads = loss_and_grads(
        chunked_linear_cross_entropy, hidden, weight, bias, labels, num_items_in_batch=50
    )
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert_all_close(actual_grads, expected_grads)


def test_scaled_loss_scales_gradients():
    """Backward multiplies by the upstream gradient (loss scaling, loss weights)."""
    hidden, weight, bias, labels = leaf_inputs()
    expected = torch.autograd.grad(3 * reference_loss(hidden, weight, labels, bias), hidden)[0]
    loss = chunked_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=4)
    torch.testing.assert_close(torch.autograd.grad(3 * loss, hidden)[0], expected, **TOLERANCE)


def test_no_grad_and_all_ignored():
    hidden, weight, bias, labels = leaf_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=4),
            reference_loss(hidden, weight, labels, bias),
            **TOLERANCE,
        )
    ignored = torch.full_like(labels, -100)
    assert chunked_linear_cross_entropy(hidden, weight, ignored).item() == 0.0


def test_autocast_bf16_keeps_parameter_dtypes():
    hidden, weight, bias, labels = leaf_inputs()
    expected = reference_loss(hidden, weight, labels, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=8)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert loss.dtype == torch.float32
    assert all(grad.dtype == torch.float32 for grad in grads)
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)


def test_fused_available_is_false_here():
    assert fused_available() is False  # no liger_kernel, no CUDA in CI


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def tiny_gptj() -> GPTJForCausalLM:
    config = GPTJConfig(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        rotary_dim=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPTJForCausalLM(config)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 13), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def trained_loss_and_grads(model, **kwargs):
    model.zero_grad()
    loss = model(**batch(), **kwargs).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_gptj], ids=["gpt2", "gptj"])
@pytest.mark.parametrize("num_items_in_batch", [None, 30])
def test_patched_model_matches_unpatched(build, num_items_in_batch):
    torch.manual_seed(0)
    model = build()
    if model.lm_head.bias is not None:  # GPT-J: a non-zero bias, so a missing one would show
        nn.init.normal_(model.lm_head.bias)
    patched = patch_model_for_chunked_loss(copy.deepcopy(model), chunk_size=5)
    assert patched(**batch()).logits is None  # the chunked path ran
    kwargs = {} if num_items_in_batch is None else dict(num_items_in_batch=num_items_in_batch)
    expected, expected_grads = trained_loss_and_grads(model, **kwargs)
    actual, actual_grads = trained_loss_and_grads(patched, **kwargs)
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in actual_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCE, msg=name)


def test_patched_model_keeps_inference_and_signature():
    model = tiny_gpt2()
    patched = patch_model_for_chunked_loss(copy.deepcopy(model))
    assert patched(**batch()).logits is None
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    torch.testing.assert_close(patched(**inputs).logits, model(**inputs).logits)
    # Trainer keeps the dataset columns that forward's signature names.
    assert "attention_mask" in inspect.signature(patched.forward).parameters
    assert list(patched.state_dict()) == list(model.state_dict())


def test_patched_peft_model_matches_unpatched():
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    model = get_peft_model(tiny_gpt2(), lora)
    patched = patch_model_for_chunked_loss(copy.deepcopy(model), chunk_size=5)
    assert patched(**batch()).logits is None
    expected, expected_grads = trained_loss_and_grads(model)
    actual, actual_grads = trained_loss_and_grads(patched)
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert actual_grads.keys() == expected_grads.keys() and actual_grads
    for name, grad in actual_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCE, msg=name)
