"""`finetune bench`: both runs, the FLOPs formula, MFU only where a peak is known."""

import json

import pytest

from finetune.bench import flops_per_token, format_report, peak_tflops

from .conftest import DEMO, build_tiny_model, run_cli, tiny_config_arg


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_device_name(name, expected):
    assert peak_tflops(name) == expected


def test_flops_formula():
    model = build_tiny_model("gpt2")  # 2 layers, width 64
    n = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, model.config, 128) == 6 * n + 12 * 2 * 64 * 128


def test_bench_runs_both_on_cpu(corpus, capsys):
    code = run_cli(
        "bench",
        DEMO,
        "model.architecture=gpt_neo",
        tiny_config_arg("gpt_neo"),
        f"data.train={corpus['train']}",
        f"data.validation={corpus['validation']}",
        "tokenizer.train_vocab_size=512",
        "data.packing=documents",
        "training.per_device_train_batch_size=4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours, baseline = result["finetune"], result["baseline"]
    assert ours["batch"] == 4 and baseline["batch"] == 8  # run_clm's default batch
    assert ours["tokens_per_s"] > 0 and baseline["tokens_per_s"] > 0
    assert result["speedup"] == pytest.approx(
        ours["tokens_per_s"] / baseline["tokens_per_s"], rel=1e-2
    )
    assert ours["mfu"] is None and ours["peak_memory_gib"] > 0  # CPU: no MFU, peak RSS
    assert ours["flops_per_token"] == 6 * ours["parameters"] + 12 * 2 * 64 * 64
    report = format_report(result)
    assert "baseline (run_clm)" in report and "n/a" in report and "6N + 12·L·d·T" in report


def test_bench_refuses_too_few_steps(capsys):
    assert run_cli("bench", DEMO, "--steps", "1") == 2
    assert "at least 2" in capsys.readouterr().err


def test_finetune_model_is_freed_before_the_baseline(monkeypatch, capsys):
    """The fast paths' forward closures make a reference cycle: without a collection the first
    model would still hold its memory while the baseline loads (and count in its peak)."""
    import gc
    import weakref

    from finetune import model as model_lib

    models, alive_at_baseline = [], []
    load_model = model_lib.load_model

    def remember(*args, **kwargs):
        if models:  # the baseline's model: is the first one gone?
            alive_at_baseline.append(models[0]() is not None)
        models.append(weakref.ref(model := load_model(*args, **kwargs)))
        return model

    monkeypatch.setattr(model_lib, "load_model", remember)
    gc.disable()  # only bench's own collection may free it
    try:
        assert run_cli("bench", DEMO, "speed.loss=chunked", "--steps", "2", "--warmup", "1") == 0
    finally:
        gc.enable()
    capsys.readouterr()
    assert alive_at_baseline == [False]
