"""`finetune generate`: seeded, batched, from full and LoRA runs, with clear errors."""

import json

import pytest
import torch

from finetune.generate import sample

from .conftest import build_tiny_model, run_cli


def _generate(capsys, run, *args) -> str:
    assert run_cli("generate", run, *args) == 0
    return capsys.readouterr().out


def test_same_seed_same_text(full_run, capsys):
    args = ["--prompt", "Maya: Welcome", "--max-new-tokens", "16"]
    first = _generate(capsys, full_run, *args, "--seed", "0")
    assert first.startswith("Maya: Welcome") and len(first.strip()) > len("Maya: Welcome")
    assert _generate(capsys, full_run, *args, "--seed", "0") == first
    assert _generate(capsys, full_run, *args, "--seed", "1") != first


def test_prompts_file_samples_and_out(lora_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Maya: Welcome\n\nSam: Hello\n")
    out = tmp_path / "out" / "samples.jsonl"
    printed = _generate(
        capsys,
        lora_run,
        "--prompts-file",
        prompts,
        "--num-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--top-k",
        "0",
        "--top-p",
        "1.0",
        "--out",
        out,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in records] == [
        ("Maya: Welcome", 0),
        ("Maya: Welcome", 1),
        ("Sam: Hello", 0),
        ("Sam: Hello", 1),
    ]
    assert "--- prompt 2, sample 2" in printed and records[3]["text"] in printed
    assert not (lora_run / "merged").exists(), "LoRA runs generate without merging"


def test_greedy_samples_repeat_and_rng_is_untouched(tokenizer):
    torch.manual_seed(0)
    model = build_tiny_model("gpt_neo", vocab_size=len(tokenizer)).eval()
    rng = torch.get_rng_state()
    (texts,) = sample(model, tokenizer, ["Maya:"], max_new_tokens=5, temperature=0, num_samples=3)
    assert len(texts) == 3 and texts[0] == texts[1] == texts[2]
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompts-file", "{tmp}/none.txt"], "file not found"),
        (["--prompts-file", "{tmp}/blank.txt"], "holds no prompt"),
        (["--prompt", "x", "--top-p", "0"], "--top-p must be"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature must be"),
        (["--prompt", "x", "--num-samples", "0"], "--num-samples must be"),
        (["--prompt", "x", "--out", "{tmp}"], "is a folder"),
    ],
)
def test_bad_input_exits_2(full_run, tmp_path, capsys, args, message):
    (tmp_path / "blank.txt").write_text("\n  \n")
    args = [a.format(tmp=tmp_path) for a in args]
    assert run_cli("generate", full_run, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_run_exits_2(tmp_path, capsys):
    assert run_cli("generate", tmp_path / "nope", "--prompt", "x") == 2
    assert "run folder not found" in capsys.readouterr().err
