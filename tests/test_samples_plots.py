"""Samples at every evaluation (samples.jsonl, TensorBoard) and the end-of-training plots."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from finetune.config import EvalSpec, load_recipe
from finetune.errors import FinetuneError
from finetune.plots import loss_figure, perplexity_figure, with_initial_eval
from finetune.samples import SamplesCallback, sample_callbacks

from .conftest import DEMO, build_tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


def test_training_writes_one_sample_per_prompt_per_evaluation(full_run):
    prompts = yaml.safe_load(DEMO.read_text())["eval"]["prompts"]
    records = [json.loads(line) for line in (full_run / "samples.jsonl").read_text().splitlines()]
    assert all(set(r) == {"step", "prompt", "text"} for r in records)
    # train_tiny evaluates before training, at steps 15 and 30, and again at the end (step 30)
    steps = sorted({r["step"] for r in records})
    assert steps == [0, 15, 30]
    for step in steps:
        assert [r["prompt"] for r in records if r["step"] == step] == prompts
    assert all(isinstance(r["text"], str) for r in records)


def test_training_writes_plots(full_run):
    for name in ("loss.png", "perplexity.png"):
        data = (full_run / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    history = json.loads((full_run / "plots" / "history.json").read_text())
    assert any(e.get("step") == 0 and "eval_loss" in e for e in history)
    assert any("loss" in e for e in history)


def test_loss_figure_has_both_curves_title_and_labels():
    history = [
        {"step": 5, "loss": 3.0},
        {"step": 10, "loss": 2.5},
        {"step": 10, "eval_loss": 2.7},
        {"step": 10, "train_loss": 2.8},
    ]
    history = with_initial_eval(history, {"eval_loss_before": 4.0})
    axes = loss_figure(history).axes[0]
    assert axes.get_title() and axes.get_xlabel() == "step" and "loss" in axes.get_ylabel()
    train, evals = axes.get_lines()
    assert list(train.get_xdata()) == [5, 10] and list(evals.get_xdata()) == [0, 10]
    assert list(evals.get_ydata()) == [4.0, 2.7]


def test_perplexity_figure_bars():
    axes = perplexity_figure(900.0, 300.0).axes[0]
    assert [bar.get_height() for bar in axes.patches] == [900.0, 300.0]
    assert axes.get_title() and axes.get_ylabel() and axes.get_xlabel()


@pytest.fixture
def callback_parts(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_tiny_model("gpt2", vocab_size=len(tokenizer))
    spec = EvalSpec(prompts=["Maya: Hello", "Sam:"], max_new_tokens=6)
    args = SimpleNamespace(report_to=["tensorboard"], output_dir=str(tmp_path))
    return model, spec, args


def _state(step: int, main: bool = True):
    return SimpleNamespace(global_step=step, is_world_process_zero=main)


def test_callback_writes_jsonl_and_tensorboard(callback_parts, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model, spec, args = callback_parts
    (tmp_path / "samples.jsonl").write_text("left over from an earlier run\n")
    callback = SamplesCallback(spec, tokenizer, tmp_path)
    model.train()
    rng = torch.get_rng_state()
    callback.on_evaluate(args, _state(10), None, model=model)
    assert torch.equal(rng, torch.get_rng_state()), "sampling must not disturb training's RNG"
    assert model.training, "the model goes back to training mode"
    callback.on_evaluate(args, _state(10), None, model=model)  # final eval repeats the step
    callback.on_evaluate(args, _state(20), None, model=model)
    records = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in records] == [
        (10, "Maya: Hello"),
        (10, "Sam:"),
        (20, "Maya: Hello"),
        (20, "Sam:"),
    ]
    assert records[0]["text"] == records[2]["text"], "same weights and seed, same text"
    events = list((tmp_path / "runs" / "samples").glob("events.out.tfevents.*"))
    assert events and b"samples/prompt_1" in events[0].read_bytes()


def test_callback_writes_nothing_off_the_main_process(callback_parts, tokenizer, tmp_path):
    model, spec, args = callback_parts
    SamplesCallback(spec, tokenizer, tmp_path).on_evaluate(
        args, _state(1, main=False), None, model=model
    )
    assert not (tmp_path / "samples.jsonl").exists() and not (tmp_path / "runs").exists()


def test_sample_callbacks_from_the_recipe(tokenizer):
    assert len(sample_callbacks(load_recipe(DEMO), tokenizer, resumed=False)) == 1
    assert sample_callbacks(load_recipe(DEMO, ["eval.prompts=[]"]), tokenizer, False) == []
    with pytest.raises(FinetuneError, match=r"eval.prompts\[1\] is empty"):
        sample_callbacks(load_recipe(DEMO, ["eval.prompts=[a, ' ']"]), tokenizer, False)
    with pytest.raises(FinetuneError, match="eval.top_p"):
        sample_callbacks(load_recipe(DEMO, ["eval.top_p=0"]), tokenizer, False)


def test_resumed_run_appends_without_repeating_steps(callback_parts, tokenizer, tmp_path):
    model, spec, args = callback_parts
    SamplesCallback(spec, tokenizer, tmp_path).on_evaluate(args, _state(0), None, model=model)
    resumed = SamplesCallback(spec, tokenizer, tmp_path, append=True)
    resumed.on_evaluate(args, _state(0), None, model=model)  # the fresh model's evaluation
    resumed.on_evaluate(args, _state(15), None, model=model)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 0, 15, 15]
