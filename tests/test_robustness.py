"""Bad input everywhere, resume after SIGKILL, Ctrl-C, a NaN loss: never lose finished work."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .conftest import DEMO, ROOT, run_cli

FAST = ["training.max_steps=2", "training.eval_strategy=no"]


def _bad_inputs(tmp_path):
    """(case, overrides) pairs, each of which must exit 2 and write nothing."""
    files = {
        "empty.txt": b"",
        "blank.txt": b"  \n \n",
        "binary.txt": b"GIF89a\x00\x01",
        "latin1.txt": "na\u00efve caf\u00e9 ".encode("latin-1") * 100,
        "bad.jsonl": b'{"text": "ok"}\n{"text": oops}\n',
        "nocol.jsonl": b'{"body": "words"}\n',
        "tiny.txt": b"Maya: hi.",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "broken.yaml").write_text("model: {architecture: gpt2\n")
    sample = str(ROOT / "data" / "sample-podcast.txt")
    return [
        ("missing corpus", ["data.train=nowhere.txt"]),
        *[
            (name, [f"data.train={tmp_path / name}"])
            for name in (
                "empty.txt",
                "blank.txt",
                "binary.txt",
                "latin1.txt",
                "bad.jsonl",
                "nocol.jsonl",
            )
        ],
        ("validation smaller than a block", [f"data.validation={tmp_path / 'tiny.txt'}"]),
        (
            "corpus smaller than a block",
            [f"data.train={tmp_path / 'tiny.txt'}", f"data.validation={sample}"],
        ),
        ("block size 0", ["data.block_size=0"]),
        ("block size beyond context", ["data.block_size=100000"]),
        ("unknown family", ["model.architecture=llama"]),
        ("wrong type", ["training.max_steps=many"]),
        ("validation fraction", ["data.validation_split=0"]),
        ("negative learning rate", ["training.learning_rate=-1"]),
        ("fp16 without a GPU", ["training.fp16=true"]),
        ("lora targets", ["lora.enabled=true", "lora.target_modules=[q_proj]"]),
        ("hub id offline", ["model.architecture=null", "model.name=EleutherAI/gpt-neo-125m"]),
        ("misspelt key", ["data.blocksize=64"]),
    ]


def test_bad_input_matrix_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    for case, overrides in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        start = time.monotonic()
        code = run_cli("train", DEMO, *FAST, *overrides, f"training.output_dir={out}")
        err = capsys.readouterr().err
        messages = [line for line in err.splitlines() if "finetune:" in line]
        assert code == 2, case
        assert len(messages) == 1 and messages[0].startswith("finetune: error:"), (case, err)
        assert "Traceback" not in err, case
        assert not out.exists(), case
        assert time.monotonic() - start < 20, case


def test_missing_recipe_and_yaml_errors(tmp_path, capsys):
    assert run_cli("check", tmp_path / "nope.yaml") == 2
    assert "recipe file not found" in capsys.readouterr().err
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  architecture: gpt2\n  config: {n_layer: 2\n")
    assert run_cli("train", bad) == 2
    assert "line 4, column 1" in capsys.readouterr().err


def test_existing_folder_is_left_exactly_as_it_was(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    assert (
        run_cli(
            "train",
            DEMO,
            "lora.enabled=true",
            "lora.target_modules=[nope]",
            f"training.output_dir={out}",
            "--overwrite",
        )
        == 2
    )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_cli_shows_no_traceback_without_debug_and_one_with_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "finetune", "check", str(DEMO), "data.train=nowhere.txt"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    debug = subprocess.run(
        cmd[:3] + ["--debug"] + cmd[3:],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr


def test_check_json_reports_tokens_steps_and_memory(capsys):
    assert run_cli("check", DEMO, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["train"]["tokens"] > 1000
    assert report["data"]["total_steps"] == 200
    assert report["memory_gib"]["total"] > 0
    assert report["model"]["family"] == "gpt2" and report["model"]["parameters"] > 0


def test_report_to_an_integration_not_installed_exits_2_before_anything(tmp_path, capsys):
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    missing = sorted(set(INTEGRATION_TO_CALLBACK) - set(get_available_reporting_integrations()))[0]
    out = tmp_path / "out"
    code = run_cli("train", DEMO, f"training.report_to={missing}", f"training.output_dir={out}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and f"{missing} is not installed" in err


def test_overrides_may_follow_flags(capsys):
    assert run_cli("check", DEMO, "--json", "data.block_size=32") == 0
    assert json.loads(capsys.readouterr().out)["data"]["train"]["blocks"] > 200  # 132 at 64
    with pytest.raises(SystemExit) as exited:  # a misspelt flag is still an error
        run_cli("check", DEMO, "--jsn", "data.block_size=32")
    assert exited.value.code == 2 and "unrecognized arguments: --jsn" in capsys.readouterr().err


def test_check_reports_speed_here_and_on_a_gpu(capsys):
    assert run_cli("check", DEMO, "tokenizer.train_vocab_size=500", "--json") == 0
    speed = json.loads(capsys.readouterr().out)["speed"]
    assert speed["here"] == {
        "precision": "fp32",
        "tf32": False,
        "attention": "sdpa",
        "loss": "standard",
        "optimizer": "adamw_torch",
        "compile": False,
        "vocab_rows": 500,
    }
    gpu = speed["cuda"]
    assert gpu["precision"] == "bf16" and gpu["compile"] and gpu["vocab_rows"] == 512
    assert gpu["optimizer"] == "adamw_torch_fused"

    assert run_cli("check", DEMO, "lora.enabled=true", "--json") == 0
    gpu = json.loads(capsys.readouterr().out)["speed"]["cuda"]
    assert gpu["loss"] == "chunked" and not gpu["compile"] and gpu["vocab_rows"] == 1024


def test_check_memory_counts_the_chunked_loss(capsys):
    big = ["data.block_size=256", "training.per_device_train_batch_size=32", "--json"]
    assert run_cli("check", DEMO, *big) == 0
    standard = json.loads(capsys.readouterr().out)["memory_gib"]["logits"]
    assert run_cli("check", DEMO, "speed.loss=chunked", *big) == 0
    chunked = json.loads(capsys.readouterr().out)["memory_gib"]["logits"]
    assert chunked == pytest.approx(standard * 1024 / (256 * 32), abs=1e-3)


def test_check_warns_about_swapped_sets_high_rates_and_a_used_folder(tmp_path, full_run, capsys):
    sample = ROOT / "data" / "sample-podcast.txt"
    small = tmp_path / "small.txt"
    small.write_text(sample.read_text()[:3000])
    overrides = [f"data.train={small}", f"data.validation={sample}", "--json"]
    assert run_cli("check", DEMO, f"training.output_dir={full_run}", *overrides) == 0
    warnings = "\n".join(json.loads(capsys.readouterr().out)["warnings"])
    assert "larger than the training set" in warnings
    assert f"the output folder {full_run} is not empty" in warnings
    assert "learning_rate" not in warnings  # 3e-3 from scratch is fine

    assert (
        run_cli(
            "check",
            DEMO,
            f"model.name={full_run}",
            "model.architecture=null",
            "training.learning_rate=0.01",
            "--json",
        )
        == 0
    )
    warnings = "\n".join(json.loads(capsys.readouterr().out)["warnings"])
    assert "training.learning_rate 0.01 is high for a full fine-tune of pretrained" in warnings


def test_check_lists_lora_modules_and_warns(capsys):
    assert run_cli("check", DEMO, "lora.enabled=true", "lora.target_modules=all", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["model"]["lora_modules"]) == 8  # c_attn, c_proj, c_fc, c_proj x 2 layers
    assert 0 < report["model"]["trainable"] < report["model"]["parameters"]


def test_nan_loss_stops_naming_the_step_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    code = run_cli(
        "train",
        DEMO,
        f"training.output_dir={out}",
        "training.max_steps=30",
        "training.learning_rate=1e12",
        "training.max_grad_norm=0",
        "training.logging_steps=1",
        "training.eval_strategy=no",
        "eval.prompts=[]",
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "NaN or infinite by step" in err and "last good checkpoint: none" in err
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


def _train_process(out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "finetune",
        "train",
        str(DEMO),
        f"training.output_dir={out}",
        "training.eval_strategy=no",
        "eval.prompts=[]",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    steps = ["training.max_steps=40", "training.save_steps=10"]
    whole = _train_process(tmp_path / "whole", *steps)
    assert whole.wait(timeout=300) == 0
    killed_out = tmp_path / "killed"
    killed = _train_process(killed_out, *steps)
    _wait_for(killed_out / "checkpoint-20" / "trainer_state.json", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (killed_out / "metrics.json").exists()
    resumed = _train_process(killed_out, *steps, "training.resume_from_checkpoint=auto")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((killed_out / "metrics.json").read_text())
    assert a["global_step"] == b["global_step"] == 40
    assert a["train_tokens"] == b["train_tokens"]  # the count is checkpointed and resumed
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=0.01)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = _train_process(out, "training.max_steps=100000", "training.save_steps=5")
    _wait_for(out / "checkpoint-5" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert "resume with training.resume_from_checkpoint=auto" in proc.stderr.read()
    from finetune.guards import last_checkpoint

    last = int(last_checkpoint(str(out)).rsplit("-", 1)[1])
    assert last >= 5
    resumed = _train_process(
        out,
        f"training.max_steps={last + 3}",
        "training.save_steps=5",
        "training.resume_from_checkpoint=auto",
    )
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert json.loads((out / "metrics.json").read_text())["global_step"] == last + 3


def _torchrun_process(out, log, *extra):
    """`finetune train` on 2 CPU processes, in its own session so a hang can be killed whole."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "finetune", "train"]
    cmd += [str(DEMO), f"training.output_dir={out}", "training.eval_strategy=no"]
    cmd += ["training.disable_tqdm=true", "eval.prompts=[]", *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _finish(proc, log, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"hung for {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_ctrl_c_to_one_torchrun_worker_stops_every_rank_at_one_step(tmp_path):
    import psutil

    from finetune.guards import last_checkpoint

    out, log = tmp_path / "run", tmp_path / "log.txt"
    with log.open("w") as sink:
        proc = _torchrun_process(out, sink, "training.max_steps=100000", "training.save_steps=5")
        try:
            started = out / "checkpoint-5" / "trainer_state.json"
            while not started.exists():
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.05)
            workers = psutil.Process(proc.pid).children()
            rank1 = next(w for w in workers if w.environ().get("RANK") == "1")
            rank1.send_signal(signal.SIGINT)  # as a launcher or `kill -INT` might: one rank only
            code = _finish(proc, log, timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    # Every worker exits 130; torchrun reports that as a failed child and exits 1.
    assert code == 1, text[-3000:]
    steps = re.findall(r"finetune: interrupted at step (\d+); checkpoint saved in (\S+);", text)
    assert len(steps) == 2 and steps[0] == steps[1], text[-3000:]
    step, checkpoint = int(steps[0][0]), steps[0][1]
    assert checkpoint == last_checkpoint(str(out)) == str(out / f"checkpoint-{step}")
    assert (
        json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"]
        == step
    )
    assert text.count("finetune: Ctrl-C: saving a checkpoint") == 1  # rank 0 says it, once

    with log.open("w") as sink:
        resumed = _torchrun_process(
            out, sink, f"training.max_steps={step + 2}", "training.resume_from_checkpoint=auto"
        )
        assert _finish(resumed, log, timeout=120) == 0, log.read_text()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == step + 2 and metrics["world_size"] == 2
