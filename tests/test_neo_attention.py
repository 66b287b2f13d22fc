"""The SDPA GPT-Neo attention must reproduce transformers' eager attention exactly (fp32, CPU)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from finetune.neo_attention import GPTNeoSdpaSelfAttention, enable_sdpa

SEQ_LEN = 32
VOCAB = 128
TOLERANCE = 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(autouse=True)
def no_eager_fallback(monkeypatch):
    """Patched layers may not quietly fall back to the eager attention."""

    def eager_attention(*args, **kwargs):
        raise AssertionError("the SDPA layer ran the eager attention")

    monkeypatch.setattr(GPTNeoSdpaSelfAttention, "_attn", eager_attention)


@pytest.fixture(scope="module")
def models() -> tuple[GPTNeoForCausalLM, GPTNeoForCausalLM]:
    """An eager tiny GPT-Neo (one global, one local layer) and its SDPA copy."""
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        # A window much shorter than SEQ_LEN, so that the local layer differs from a global one.
        window_size=8,
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        attn_implementation="eager",
        bos_token_id=None,  # GPT-Neo's 50256 lies outside the tiny vocabulary
        eos_token_id=None,
    )
    eager = GPTNeoForCausalLM(config).eval()
    sdpa = copy.deepcopy(eager)
    assert enable_sdpa(sdpa) == 2
    return eager, sdpa


def random_ids(batch: int = 3, length: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def test_patch_swaps_classes_and_keeps_state_dict(models):
    eager, sdpa = models
    layers = [block.attn.attention for block in sdpa.transformer.h]
    assert all(type(layer) is GPTNeoSdpaSelfAttention for layer in layers)
    assert [layer.attention_type for layer in layers] == ["global", "local"]
    assert list(sdpa.state_dict()) == list(eager.state_dict())
    assert enable_sdpa(sdpa) == 0  # already patched


def test_logits_match_without_padding(models):
    eager, sdpa = models
    ids = random_ids()
    with torch.no_grad():
        expected = eager(ids).logits
        actual = sdpa(ids).logits
    assert relative_error(actual, expected) < TOLERANCE


def test_local_window_matters(models):
    """Guards the test itself: were the window ignored, the local layer would be global."""
    eager, _ = models
    as_global = copy.deepcopy(eager)
    local = as_global.transformer.h[1].attn.attention
    local.bias.copy_(as_global.transformer.h[0].attn.attention.bias)
    ids = random_ids()
    with torch.no_grad():
        assert relative_error(as_global(ids).logits, eager(ids).logits) > 1e-2


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_with_padding(models, side):
    eager, sdpa = models
    ids = random_ids()
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 5, 13]):
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, SEQ_LEN - pad :] = 0
    # Left padding needs positions that start at 0 on the first real token, as in generate().
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask, position_ids=positions).logits
        actual = sdpa(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert torch.isfinite(actual).all()  # fully masked (left-pad) rows must not spread NaNs
    assert relative_error(actual[real], expected[real]) < TOLERANCE


def test_packed_documents_match_eager_and_stay_apart(models):
    """position_ids restarting per document: no document sees another one."""
    eager, sdpa = models
    ids = random_ids(batch=1)
    lengths = [12, 20]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        expected = eager(ids, position_ids=positions, use_cache=False).logits
        actual = sdpa(ids, position_ids=positions, use_cache=False).logits
        second_alone = sdpa(ids[:, lengths[0] :]).logits
    assert relative_error(actual, expected) < TOLERANCE
    assert relative_error(actual[:, lengths[0] :], second_alone) < TOLERANCE


def test_gradients_match(models):
    eager, sdpa = models
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, -7:] = 0
    grads = []
    for model in (eager, sdpa):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        model.zero_grad()
    for name, expected in grads[0].items():
        assert relative_error(grads[1][name], expected) < TOLERANCE, name


def test_peft_wrapped_model(models):
    eager, _ = models
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    eager_lora = get_peft_model(copy.deepcopy(eager), lora).eval()
    sdpa_lora = copy.deepcopy(eager_lora)
    assert enable_sdpa(sdpa_lora) == 2
    assert list(sdpa_lora.state_dict()) == list(eager_lora.state_dict())
    ids = random_ids()
    with torch.no_grad():
        assert relative_error(sdpa_lora(ids).logits, eager_lora(ids).logits) < TOLERANCE


def test_greedy_generation_is_identical(models):
    """Prefill plus cached decoding well past the local window, with left padding."""
    eager, sdpa = models
    ids = random_ids(batch=2, length=10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = eager.generate(ids, **kwargs)
    actual = sdpa.generate(ids, **kwargs)
    assert torch.equal(actual, expected)


def test_save_and_reload(models, tmp_path):
    """The patch leaves no trace in saved files: a plain load gives the same model."""
    eager, sdpa = models
    sdpa.save_pretrained(tmp_path)
    reloaded = GPTNeoForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = random_ids()
    with torch.no_grad():
        assert relative_error(reloaded(ids).logits, eager(ids).logits) < TOLERANCE
