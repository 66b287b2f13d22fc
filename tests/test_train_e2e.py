"""End to end through the real CLI: every family, full and LoRA, on tiny models for a few steps."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from .conftest import DEMO, ROOT, run_cli, tiny_config_arg, train_tiny

METRIC_KEYS = {
    "eval_loss_before",
    "perplexity_before",
    "eval_loss",
    "perplexity",
    "train_loss",
    "global_step",
    "train_tokens",
    "train_seconds",
}


def _generate_with_pipeline(path) -> str:
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(path), device="cpu")
    out = generator("Maya:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith("Maya:") and len(out) > len("Maya:")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gptj"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_every_family(tmp_path, corpus, family, lora):
    run = train_tiny(tmp_path / "run", corpus, family, lora, 30)
    metrics = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["global_step"] == 30
    assert metrics["perplexity"] < metrics["perplexity_before"]
    assert 0 < metrics["train_tokens"] <= 30 * 16 * 64 and metrics["train_tokens"] % 64 == 0
    recipe = (run / "recipe.yaml").read_text()
    assert f"architecture: {family}" in recipe and f"enabled: {str(lora).lower()}" in recipe
    assert not list(run.glob("*.bin")), "weights must be safetensors only"
    if lora:
        from peft import AutoPeftModelForCausalLM

        assert (run / "adapter_model.safetensors").is_file() and (run / "base").is_dir()
        assert AutoPeftModelForCausalLM.from_pretrained(str(run)) is not None
        assert run_cli("merge", run) == 0
        _generate_with_pipeline(run / "merged")
    else:
        _generate_with_pipeline(run)


@pytest.mark.slow
def test_fine_tune_a_fine_tune(tmp_path, corpus, full_run):
    out = tmp_path / "again"
    code = run_cli(
        "train",
        DEMO,
        "model.architecture=null",
        f"model.name={full_run}",
        "model.config={}",
        "tokenizer.train_vocab_size=null",
        f"data.train={corpus['train']}",
        f"data.validation={corpus['validation']}",
        f"training.output_dir={out}",
        "training.max_steps=10",
    )
    assert code == 0
    before = json.loads((full_run / "metrics.json").read_text())["eval_loss"]
    assert json.loads((out / "metrics.json").read_text())["eval_loss_before"] == pytest.approx(
        before, rel=1e-3
    )


def _cli(*args, timeout=60):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "finetune", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("override", ["lora.rnak=4", "trainig.max_steps=3", "data.blocksize=64"])
def test_misspelt_key_exits_2_fast_with_one_line_and_writes_nothing(tmp_path, override):
    out = tmp_path / "out"
    start = time.monotonic()
    result = _cli("train", DEMO, override, f"training.output_dir={out}")
    assert time.monotonic() - start < 10
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_non_empty_output_folder_is_refused(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = _cli("train", DEMO, f"training.output_dir={out}")
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_hub_model_offline_fails_fast_naming_the_demo(tmp_path):
    start = time.monotonic()
    result = _cli(
        "train",
        DEMO,
        "model.architecture=null",
        "model.name=gpt2",
        "model.config={}",
        f"training.output_dir={tmp_path / 'x'}",
    )
    assert time.monotonic() - start < 15
    assert result.returncode == 2
    assert "offline-demo.yaml" in result.stderr and "Traceback" not in result.stderr


def test_block_size_beyond_context_is_refused(tmp_path):
    result = _cli("check", DEMO, "data.block_size=4096")
    assert result.returncode == 2 and "beyond the model's context of 256" in result.stderr


def _torchrun(port: int, *args: str) -> subprocess.CompletedProcess:
    """2 CPU processes under torchrun (gloo); args: a module (-m ...) or a script, then its own."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, corpus):
    out = tmp_path / "ddp"
    result = _torchrun(
        29533,
        "-m",
        "finetune",
        "train",
        str(DEMO),
        tiny_config_arg("gpt2"),
        f"data.train={corpus['train']}",
        f"data.validation={corpus['validation']}",
        f"training.output_dir={out}",
        "training.max_steps=12",
        "training.save_steps=6",
        "training.eval_steps=6",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 12
    assert 12 * 16 * 64 < metrics["train_tokens"] <= 12 * 16 * 2 * 64  # both ranks counted
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-12",
        "checkpoint-6",
    ]
    assert not (out / ".staging").exists()


@pytest.mark.slow
def test_torchrun_processes_train_one_model(tmp_path):
    """DDP really wraps the model: both processes end with the same weights (they would not if
    each trained its own copy, as happened when the model was evaluated before training)."""
    probe = str(ROOT / "tests" / "ddp_probe.py")
    result = _torchrun(
        29534, probe, str(tmp_path / "run"), "training.max_steps=4", "eval.prompts=[]"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    probes = re.findall(r"probe rank=(\d) wrapper=(\w+) checksum=(\S+)", result.stdout)
    assert sorted(rank for rank, _, _ in probes) == ["0", "1"], result.stdout[-2000:]
    assert {wrapper for _, wrapper, _ in probes} == {"DistributedDataParallel"}
    assert len({checksum for _, _, checksum in probes}) == 1
