"""`finetune.load`: completion, embeddings, similarity, classification and perplexity."""

import math
import subprocess
import sys

import pytest
import torch

import finetune
from finetune.errors import FinetuneError
from finetune.evaluate import score_tokens

from .conftest import ROOT


@pytest.fixture(scope="module")
def lm(full_run):
    return finetune.load(full_run)


def test_import_finetune_does_not_import_torch():
    code = "import sys, finetune; assert callable(finetune.load); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_complete_is_seeded(lm):
    first = lm.complete("Maya: Welcome", max_new_tokens=16, seed=0)
    assert isinstance(first, str) and first
    assert lm.complete("Maya: Welcome", max_new_tokens=16, seed=0) == first
    assert lm.complete("Maya: Welcome", max_new_tokens=16, seed=1) != first


def test_batched_greedy_completion_equals_one_by_one(lm):
    # Left padding with a masked pad (= end-of-text) must not change any continuation.
    prompts = ["Sam:", "Dr. Lena Ortiz: It's mostly true. The turbopump", "Maya: So"]
    batched = lm.complete(prompts, max_new_tokens=10, temperature=0)
    assert batched == [lm.complete(p, max_new_tokens=10, temperature=0) for p in prompts]


def test_embed_one_vector_per_text_padding_invariant(lm):
    texts = ["rockets", "a much longer text about pumps, rockets and tunnels under cities"]
    vectors = lm.embed(texts)
    assert len(vectors) == 2 and all(len(v) == lm.model.config.n_embd for v in vectors)
    alone = lm.embed(["rockets"])[0]
    assert max(abs(a - b) for a, b in zip(vectors[0], alone, strict=True)) < 1e-5


def test_similarity(lm):
    assert lm.similarity("the pump failed", "the pump failed") == pytest.approx(1.0, abs=1e-4)
    assert -1.0 <= lm.similarity("the pump failed", "Welcome back to the show") < 1.0 - 1e-6


def test_log_likelihood_matches_a_direct_computation(lm):
    context, options = "Maya: Welcome back to", [" the show", " Workbench Radio, the show"]
    batched = lm.log_likelihood(context, options)
    for option, score in zip(options, batched, strict=True):
        ids = lm.tokenizer(context)["input_ids"], lm.tokenizer(option)["input_ids"]
        full = torch.tensor([ids[0] + ids[1]])
        with torch.no_grad():
            logprobs = torch.log_softmax(lm.model(input_ids=full).logits[0].float(), -1)
        expected = sum(float(logprobs[len(ids[0]) + i - 1, t]) for i, t in enumerate(ids[1]))
        assert score == pytest.approx(expected, abs=1e-4)


def test_classify_returns_a_label_and_scores(lm):
    labels = ["question", "statement"]
    examples = [
        ("How did you end up building rockets?", "question"),
        ("Pumps are not glamorous.", "statement"),
    ]
    result = lm.classify("Why did the pump fail?", labels, examples=examples)
    assert result.label in labels and set(result.scores) == set(labels)
    assert result.label == max(result.scores, key=result.scores.get)
    assert all(math.isfinite(s) and s < 0 for s in result.scores.values())
    zero_shot = lm.classify("Why did the pump fail?", labels)
    assert zero_shot.scores != result.scores  # the examples are part of the prompt
    per_token = lm.classify("Why did the pump fail?", labels, examples=examples, per_token=True)
    assert per_token.label in labels


def test_perplexity(lm):
    text = "Maya: Welcome back to Workbench Radio, the show about how things actually get built."
    value = lm.perplexity(text)
    assert isinstance(value, float) and math.isfinite(value) and value > 1
    ids = lm.tokenizer(text)["input_ids"]
    assert value == pytest.approx(score_tokens(lm.model, ids, lm.window).perplexity)
    assert lm.perplexity([text, text]) == pytest.approx([value, value])


def test_lora_run_loads_unmerged(lora_run):
    from peft import PeftModel

    lm = finetune.load(lora_run)
    assert isinstance(lm.model, PeftModel)
    assert isinstance(lm.complete("Maya:", max_new_tokens=8), str)
    assert lm.similarity("Sam", "Sam") == pytest.approx(1.0, abs=1e-4)
    assert not (lora_run / "merged").exists()


def test_bad_input_raises_finetune_errors(lm, tmp_path):
    with pytest.raises(FinetuneError, match="run folder not found"):
        finetune.load(tmp_path / "missing")
    with pytest.raises(FinetuneError, match="empty"):
        lm.complete("")
    with pytest.raises(FinetuneError, match="labels"):
        lm.classify("text", [])
    with pytest.raises(FinetuneError, match="distinct"):
        lm.classify("text", ["a", "a"])
    with pytest.raises(FinetuneError, match="at least 2 tokens"):
        lm.perplexity("a")
    with pytest.raises(FinetuneError, match="empty"):
        lm.embed(["fine", ""])
    with pytest.raises(FinetuneError, match="context"):
        lm.complete("word " * 120, max_new_tokens=64)


def test_batches_bound_items_and_padded_tokens():
    from finetune.api import MAX_BATCH, TOKENS_PER_BATCH, _batches

    items = [[0] * n for n in [3, 1000, 5, 2000, 7] + [2] * 40]
    batches = list(_batches(items))
    assert [x for b in batches for x in b] == items  # order kept, nothing lost
    for batch in batches:
        assert len(batch) <= MAX_BATCH
        assert len(batch) == 1 or max(map(len, batch)) * len(batch) <= TOKENS_PER_BATCH


def test_log_likelihood_over_several_batches(lm):
    options = [f" option {i}" for i in range(20)]  # more than one batch
    together = lm.log_likelihood("Sam: Pick one:", options)
    assert together == pytest.approx(
        [lm.log_likelihood("Sam: Pick one:", [o])[0] for o in options], abs=1e-4
    )
