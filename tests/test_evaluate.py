"""Perplexity: sliding windows, agreement with the run's own figures, `finetune eval`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from finetune.evaluate import evaluate, score_dataset, score_tokens, windows

from .conftest import build_tiny_model, run_cli


@pytest.mark.parametrize(
    "length, window, stride", [(100, 16, 4), (100, 16, 16), (37, 10, 3), (64, 64, 64), (5, 8, 2)]
)
def test_windows_score_each_token_once(length, window, stride):
    scored = []
    for begin, end, first in windows(length, window, stride):
        assert 1 <= first < end - begin <= window
        scored.extend(range(begin + first, end))
    assert len(scored) == len(set(scored))
    if stride < window:  # every token but the first, each with as much context as fits
        assert sorted(scored) == list(range(1, length))
    else:  # non-overlapping blocks: a block's first token has no context, as in training
        assert scored == [i for i in range(1, length) if i % window]


def _guide_loss(model, ids: torch.Tensor, window: int, stride: int) -> float:
    """The transformers perplexity guide's loop, counting exactly the labels the model scores."""
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + window, ids.shape[1])
        target_length = end - previous_end
        inputs = ids[:, begin:end]
        targets = inputs.clone()
        targets[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(input_ids=inputs, labels=targets).loss
        scored = int((targets[:, 1:] != -100).sum())
        nll, count = nll + float(loss) * scored, count + scored
        previous_end = end
        if end == ids.shape[1]:
            break
    return nll / count


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gptj"])
def test_score_matches_the_perplexity_guide(family):
    torch.manual_seed(0)
    model = build_tiny_model(family).eval()
    ids = torch.randint(0, 512, (1, 150))
    for window, stride in [(32, 32), (32, 8), (64, 48)]:
        score = score_tokens(model, ids[0].numpy(), window, stride)
        assert score.loss == pytest.approx(_guide_loss(model, ids, window, stride), rel=1e-5)
    assert score_tokens(model, ids[0].numpy(), 32, 8).tokens == 149


def test_non_overlapping_windows_equal_the_mean_block_loss():
    torch.manual_seed(0)
    model = build_tiny_model("gpt2").eval()
    blocks = torch.randint(0, 512, (5, 32))
    with torch.no_grad():
        expected = float(model(input_ids=blocks, labels=blocks).loss)
    score = score_tokens(model, blocks.reshape(-1).numpy(), 32)
    assert score.tokens == 5 * 31
    assert score.loss == pytest.approx(expected, rel=1e-5)
    assert score.perplexity == pytest.approx(np.exp(expected), rel=1e-5)


@pytest.mark.parametrize("packing", ["concat", "documents"])
def test_score_dataset_equals_the_trainers_evaluation(tmp_path, packing):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from finetune.config import DataSpec
    from finetune.data import TokenizedSplit
    from finetune.packing import block_dataset

    torch.manual_seed(0)
    model = build_tiny_model("gpt2").eval()
    model.loss_type = "ForCausalLM"  # as train() sets it
    lengths = np.array([50, 7, 90, 33])  # documents, each ending in end-of-text (id 0)
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.append(rng.integers(1, 512, n - 1), 0) for n in lengths])
    split = TokenizedSplit(tokens.astype(np.int32), lengths, 0)
    blocks = block_dataset(split, DataSpec(block_size=32, packing=packing))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=len(blocks),
        report_to="none",
        dataloader_pin_memory=False,
    )
    trainer = Trainer(
        model=model, args=args, eval_dataset=blocks, data_collator=default_data_collator
    )
    expected = trainer.evaluate()["eval_loss"]
    assert score_dataset(model, blocks).loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("run_name", ["full_run", "lora_run"])
def test_eval_reproduces_the_runs_metrics(request, run_name):
    run = request.getfixturevalue(run_name)
    metrics = json.loads((run / "metrics.json").read_text())
    result = evaluate(run, base=True)
    assert result["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-3)
    assert result["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-3)
    # the base is rebuilt (random init, same seed) or read from RUN/base: the run's start
    assert result["base_perplexity"] == pytest.approx(metrics["perplexity_before"], rel=1e-3)
    blocks = metrics["data"]["validation"]["blocks"]
    assert result["tokens"] == blocks * (result["window"] - 1)


def test_eval_cli_json_with_stride(full_run, capsys):
    assert run_cli("eval", full_run, "--json", "--stride", "16") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"perplexity", "eval_loss", "tokens", "window", "stride"} <= set(result)
    assert result["stride"] == 16 and result["window"] == 64
    blocks = json.loads((full_run / "metrics.json").read_text())["data"]["validation"]["blocks"]
    assert result["tokens"] == blocks * 64 - 1  # overlapping windows score all but the first
    assert 1 < result["perplexity"] < float("inf") and "base_perplexity" not in result


def test_eval_cli_base_side_by_side(lora_run, capsys):
    assert run_cli("eval", lora_run, "--base") == 0
    out = capsys.readouterr().out
    assert "tuned" in out and "base" in out and "LoRA run's saved base" in out


def test_eval_model_folder_on_other_data(full_run, corpus, capsys):
    folder = full_run / "checkpoint-30"  # a plain model folder: weights and tokenizer, no recipe
    assert run_cli("eval", folder, "--data", corpus["validation"], "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["window"] == 128 and result["data"] == str(corpus["validation"])
    assert result["tokens"] > 500 and 1 < result["perplexity"] < float("inf")


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing"], "run folder not found"),
        (["{run}", "--data", "{tmp}/nope.txt"], "--data: file not found"),
        (["{run}", "--data", ""], "--data is empty"),
        (["{run}", "--stride", "0"], "--stride must be a positive"),
        (["{run}", "--stride", "65"], "larger than the window of 64"),
        (["{run}/checkpoint-30"], "pass --data"),
        (["{run}/checkpoint-30", "--base", "--data", "{run}/recipe.yaml"], "no base model"),
    ],
)
def test_eval_bad_input_exits_2(full_run, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, run=full_run) for a in args]
    assert run_cli("eval", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_training_folder_is_found_from_a_relative_output_dir(tmp_path):
    from types import SimpleNamespace

    from finetune.evaluate import training_folder

    def recipe(out):
        return SimpleNamespace(training={"output_dir": out})

    run = tmp_path / "runs" / "demo"
    assert training_folder(run, recipe("runs/demo")) == tmp_path
    assert training_folder(run, recipe("./runs/demo/")) == tmp_path
    assert training_folder(run, recipe("other/demo")) is None
    assert training_folder(run, recipe(str(run))) is None  # absolute: nothing to infer
    assert training_folder(run, recipe("../demo")) is None


def test_eval_finds_relative_data_from_another_folder(full_run, tmp_path, monkeypatch, capsys):
    # A run trained in `workdir` with relative paths, evaluated from elsewhere: data still found.
    workdir = tmp_path / "workdir"
    shutil.copytree(full_run, workdir / "run", ignore=shutil.ignore_patterns("checkpoint-*"))
    recipe = yaml.safe_load((workdir / "run" / "recipe.yaml").read_text())
    for name in ("train", "validation"):
        (workdir / f"{name}.txt").write_text(Path(recipe["data"][name]).read_text())
        recipe["data"][name] = f"{name}.txt"
    recipe["training"]["output_dir"] = "run"
    (workdir / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    assert run_cli("eval", workdir / "run", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert result["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-3)
