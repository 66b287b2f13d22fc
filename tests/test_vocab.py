"""Vocabulary padding: the padded model computes what the unpadded one does, saved unpadded."""

import copy
import json

import pytest
import torch

from finetune import fast, vocab
from finetune.config import build_recipe
from finetune.errors import FinetuneError
from finetune.loss import patch_model_for_chunked_loss
from finetune.model import load_run_model

from .conftest import build_tiny_model, train_tiny

FAMILIES = ["gpt2", "gpt_neo", "gptj"]  # GPT-2 and Neo tie the head; GPT-J's has a bias
REAL = 500  # not a multiple of 64


def _model(family):
    torch.manual_seed(0)
    model = build_tiny_model(family, vocab_size=REAL).eval()  # eval: no dropout draws
    model.loss_type = "ForCausalLM"
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunked", [False, True])
def test_padded_model_has_the_same_loss_and_gradients(family, chunked):
    plain = _model(family)
    padded = copy.deepcopy(plain)
    assert vocab.pad(padded, 64) == 512 and padded.config.vocab_size == 512
    if chunked:
        patch_model_for_chunked_loss(plain, chunk_size=7)
        patch_model_for_chunked_loss(padded, chunk_size=7)
    ids = torch.randint(0, REAL, (2, 24), generator=torch.Generator().manual_seed(1))

    loss, grads = _loss_and_grads(plain, ids)
    padded_loss, padded_grads = _loss_and_grads(padded, ids)

    torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():  # the embedding's real rows, and every other weight
        torch.testing.assert_close(padded_grads[name][: grad.shape[0]], grad, rtol=1e-5, atol=1e-7)
    # The padded rows learn nothing: no token predicts them and no input is one of them.
    assert padded.get_output_embeddings().weight.grad[REAL:].abs().max() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_logits_are_masked_and_generation_unchanged(family):
    plain = _model(family)
    padded = copy.deepcopy(plain)
    vocab.pad(padded, 64)
    ids = torch.randint(0, REAL, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = padded(ids).logits
    assert logits.shape[-1] == 512 and torch.isneginf(logits[..., REAL:]).all()
    torch.testing.assert_close(logits[..., :REAL], plain(ids).logits.detach())

    greedy = padded.generate(ids, do_sample=False, max_new_tokens=20, pad_token_id=0)
    expected = plain.generate(ids, do_sample=False, max_new_tokens=20, pad_token_id=0)
    assert torch.equal(greedy, expected)
    # Unmasked, a random model would sample a padded row about once in 40 of these 800 tokens.
    torch.manual_seed(3)
    batch = ids.repeat(8, 1)
    sampled = padded.generate(batch, do_sample=True, max_new_tokens=100, pad_token_id=0, top_k=0)
    assert sampled.max() < REAL


@pytest.mark.parametrize("family", FAMILIES)
def test_unpad_restores_the_real_vocabulary(family, tmp_path):
    plain = _model(family)
    padded = copy.deepcopy(plain)
    vocab.pad(padded, 64)

    padded.save_pretrained(tmp_path)  # a checkpoint keeps the padding and says so
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == 512 and config[vocab.REAL_SIZE] == REAL
    loaded = load_run_model(tmp_path)
    assert loaded.config.vocab_size == REAL and vocab.REAL_SIZE not in loaded.config.to_dict()

    vocab.unpad(padded)
    ids = torch.arange(10).unsqueeze(0)
    for model in (padded, loaded):
        assert model.get_output_embeddings().weight.shape[0] == REAL
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, plain(ids).logits)
    assert vocab.pad(padded, 4) is None  # 500 is a multiple of 4: nothing to do


def _recipe(lora=False, speed=None, training=None):
    return build_recipe(
        {
            "model": {"architecture": "gpt2"},
            "data": {"train": "x.txt"},
            "lora": {"enabled": lora},
            "speed": speed or {},
            "training": training or {},
        },
        check_training=False,
    )


@pytest.mark.parametrize(
    "recipe, model_type, cuda, expected",
    [
        (_recipe(), "gpt2", True, 64),
        (_recipe(), "gpt_neo", True, 64),
        (_recipe(), "gptj", True, 1),  # 50400 rows: measured for GPT-2's 50257 only
        (_recipe(), "gpt2", False, 1),
        (_recipe(lora=True), "gpt2", True, 1),
        (_recipe(training={"fsdp": "full_shard"}), "gpt2", True, 1),
        (_recipe(speed={"pad_vocab": 128}), "gptj", False, 128),
        (_recipe(speed={"pad_vocab": 1}), "gpt2", True, 1),
    ],
)
def test_auto_pads_only_measured_cases(recipe, model_type, cuda, expected):
    assert fast.pad_vocab_multiple(recipe, model_type, cuda=cuda) == expected


def test_accelerate_fsdp_launch_turns_auto_off(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fast.pad_vocab_multiple(_recipe(), "gpt2", cuda=True) == 1


@pytest.mark.parametrize(
    "recipe, message",
    [
        (_recipe(speed={"pad_vocab": 0}), "positive integer"),
        (_recipe(lora=True, speed={"pad_vocab": 64}), "with LoRA"),
        (_recipe(training={"deepspeed": "ds.json"}, speed={"pad_vocab": 64}), "sharded"),
    ],
)
def test_refused_settings(recipe, message):
    with pytest.raises(FinetuneError, match=message):
        fast.check(recipe, cuda=False)


def test_padded_run_trains_like_an_unpadded_one(tmp_path, corpus, full_run):
    run = train_tiny(tmp_path / "padded", corpus, "gpt2", False, 30, "speed.pad_vocab=100")
    metrics = json.loads((run / "metrics.json").read_text())
    reference = json.loads((full_run / "metrics.json").read_text())
    # Same random draws (the padding is drawn with the random state restored), same sums up to
    # the order of floating-point additions.
    assert metrics["eval_loss_before"] == pytest.approx(reference["eval_loss_before"], rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-4)

    final = json.loads((run / "config.json").read_text())
    assert final["vocab_size"] == 512 and vocab.REAL_SIZE not in final
    checkpoint = json.loads((run / "checkpoint-30" / "config.json").read_text())
    assert checkpoint["vocab_size"] == 600 and checkpoint[vocab.REAL_SIZE] == 512
