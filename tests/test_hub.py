"""`finetune push`: the upload folder, the model card, the token, and the upload through HfApi.

No test touches the network: dry runs must not try, and real pushes go through HfApi methods that
the tests replace. The shared tiny runs are copied first, so building RUN/upload/ changes nothing
that other tests read.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

from .conftest import run_cli, train_tiny

TOKEN = "hf_TestTokenThatMustNeverBeWritten123"
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, full_run, lora_run) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("push")
    return {
        "full": Path(shutil.copytree(full_run, folder / "full")),
        "lora": Path(shutil.copytree(lora_run, folder / "lora")),
    }


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No HF_TOKEN and no saved login."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run tried to open a connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def fake_hub(monkeypatch) -> list:
    """HfApi's create_repo, create_branch and upload_folder, recorded instead of sent."""
    from huggingface_hub import HfApi

    calls = []

    def record(name):
        def method(self, *args, **kwargs):
            if name == "upload_folder":
                root = Path(kwargs["folder_path"])
                kwargs["files"] = sorted(
                    str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                )
            calls.append((name, args, kwargs))

        return method

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    monkeypatch.setattr("finetune.net.hub_reachable", lambda: True)
    return calls


def dry_run(capsys, run: Path, *flags: str) -> Path:
    capsys.readouterr()
    assert run_cli("push", run, "--repo-id", "me/test", "--dry-run", *flags) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    folder = Path(last)
    assert folder.is_absolute() and folder.is_dir(), f"last line is not the folder: {last!r}"
    return folder


def files_of(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def check_card(
    folder: Path, library: str, base_model: str | None = None, family: str | None = "gpt2"
) -> None:
    """`base_model`: the hub id expected, or None for a run with no base on the hub (the hub
    refuses a `base_model` that is not a model id, so the field must then be absent). `family`:
    the tag expected, None where nothing here can tell (an adapter on an uncached hub base)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert card.data.base_model == base_model
    if base_model is None:
        assert "base_model" not in card.content.split("---")[1]
    assert card.data.library_name == library
    assert card.data.pipeline_tag == "text-generation"
    assert {"finetune", *([family] if family else [])} <= set(card.data.tags)
    assert f"{metrics['perplexity']:.2f}" in card.text
    assert f"{metrics['perplexity_before']:.2f}" in card.text
    assert "sha256" in card.text and "## Recipe" in card.text


def check_no_pickles(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.suffix in PICKLES]


def logits(model, tokens=(1, 2, 3, 4)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits


# --------------------------------------------------------------------------- dry runs


def test_dry_run_full_run_loads_in_a_pipeline(runs, capsys, no_network):
    from transformers import GenerationConfig, pipeline

    folder = dry_run(capsys, runs["full"])
    assert folder == (runs["full"] / "upload").resolve()
    expected = {
        "README.md",
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "recipe.yaml",
        "metrics.json",
    }
    assert expected <= files_of(folder)
    assert not any(name.startswith("checkpoint") for name in files_of(folder))
    check_no_pickles(folder)
    check_card(folder, "transformers")
    card = (folder / "README.md").read_text()
    assert "trained-from-scratch" in card and "randomly initialised gpt2" in card

    settings = GenerationConfig.from_pretrained(folder)  # the recipe's eval: sampling settings
    assert (settings.do_sample, settings.temperature, settings.top_k, settings.top_p) == (
        True,
        0.8,
        50,
        0.95,
    )
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    assert generator.model.generation_config.top_p == 0.95
    text = generator("Maya:", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Maya:") and len(text) > len("Maya:")


def test_dry_run_lora_uploads_adapter_and_its_random_base(runs, capsys, no_network):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.model import load_run_model

    folder = dry_run(capsys, runs["lora"])
    files = files_of(folder)
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "base/config.json",
        "base/model.safetensors",
    } <= files
    assert "config.json" not in files and "model.safetensors" not in files
    check_no_pickles(folder)
    check_card(folder, "peft")
    assert "base/" in (folder / "README.md").read_text()
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert str(runs["lora"]) not in adapter_config["base_model_name_or_path"]

    base = AutoModelForCausalLM.from_pretrained(str(folder / "base"))
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    assert torch.allclose(logits(model), logits(load_run_model(runs["lora"]).eval()))


def test_dry_run_merged_uploads_a_full_model(runs, capsys, no_network):
    from transformers import pipeline

    from finetune.model import load_run_model

    folder = dry_run(capsys, runs["lora"], "--merged")
    files = files_of(folder)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    assert not any(name.startswith(("adapter", "base/")) for name in files)
    check_no_pickles(folder)
    check_card(folder, "transformers")
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    merged = load_run_model(runs["lora"], merge=True).eval()
    assert torch.allclose(logits(generator.model.eval()), logits(merged), atol=1e-5)


def test_card_names_hub_dataset_license_and_shows_samples(runs):
    from huggingface_hub import ModelCard

    from finetune import card, hub

    run = hub.read_run(runs["full"])
    run.recipe["data"]["train"] = "hf:someone/podcasts:clean"
    run.recipe["hub"]["license"] = "mit"
    samples = runs["full"] / "samples.jsonl"
    samples.write_text(
        "\n".join(
            json.dumps(e)
            for e in [
                {"step": 0, "prompt": "Maya:", "text": "Maya: early"},
                {"step": 15, "prompt": "Maya:", "text": "Maya: in between"},
                {"step": 30, "prompt": "Maya:", "text": "Maya: the last word"},
            ]
        )
        + "\n"
    )
    try:
        base = hub.Base("random", "gpt2", family="gpt2")
        parsed = ModelCard(card.model_card(run, "full", "me/test", base, False, 123))
    finally:
        samples.unlink()
    assert parsed.data.datasets == ["someone/podcasts"]
    assert parsed.data.license == "mit"
    assert parsed.text.index("Maya: early") < parsed.text.index("Maya: the last word")
    assert "Maya: in between" not in parsed.text


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("repo_id", ["me", "a/b/c", "me/te--st", "-me/x", "me/"])
def test_bad_repo_id_is_one_line(runs, capsys, repo_id):
    assert run_cli("push", runs["full"], f"--repo-id={repo_id}", "--dry-run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a valid repo id" in err


def test_bad_run_folders_are_one_line(tmp_path, runs, capsys):
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": "not found",
        tmp_path / "empty": "not a run folder",
    }
    for run, message in cases.items():
        assert run_cli("push", run, "--repo-id", "me/test", "--dry-run") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert run_cli("push", runs["full"], "--repo-id", "me/test", "--merged", "--dry-run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--merged is for LoRA runs" in err


def test_no_token_exits_2_with_one_line(tmp_path, runs, capsys, no_token, no_network):
    run = Path(
        shutil.copytree(runs["full"], tmp_path / "run", ignore=shutil.ignore_patterns("upload"))
    )
    assert run_cli("push", run, "--repo-id", "me/test") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "hf auth login" in err and "HF_TOKEN" in err
    assert not (run / "upload").exists(), "nothing is built before the token is known"


# --------------------------------------------------------------------------- pushes


def test_push_goes_through_hfapi(runs, capsys, monkeypatch, fake_hub):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = run_cli(
        "push",
        runs["lora"],
        "--repo-id",
        "me/test",
        "--private",
        "--merged",
        "--revision",
        "v1",
        "--commit-message",
        "first",
    )
    assert code == 0
    names = [name for name, _, _ in fake_hub]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    (_, repo_args, repo_kwargs), (_, _, branch), (_, _, upload) = fake_hub
    assert repo_args == ("me/test",) and repo_kwargs["private"] is True
    assert repo_kwargs["exist_ok"] is True and repo_kwargs["token"] == TOKEN
    assert branch["branch"] == "v1"
    assert upload["repo_id"] == "me/test" and upload["revision"] == "v1"
    assert upload["commit_message"] == "first" and upload["token"] == TOKEN
    assert Path(upload["folder_path"]) == runs["lora"] / "upload"
    assert "model.safetensors" in upload["files"] and "adapter_config.json" not in upload["files"]
    assert "https://huggingface.co/me/test/tree/v1" in capsys.readouterr().out
    assert_token_absent(TOKEN, runs["lora"])


def test_token_never_written_in_training_and_push(tmp_path, corpus, capfd, monkeypatch, fake_hub):
    """hub.push: end pushes after training with HF_TOKEN; the token reaches no file and no log."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = train_tiny(
        tmp_path / "run",
        corpus,
        "gpt2",
        False,
        2,
        "training.save_steps=1",
        "hub.repo_id=me/at-end",
        "hub.push=end",
    )
    uploads = [kwargs for name, _, kwargs in fake_hub if name == "upload_folder"]
    assert len(uploads) == 1 and uploads[0]["repo_id"] == "me/at-end"
    assert uploads[0]["token"] == TOKEN
    assert (run / "checkpoint-1" / "training_args.bin").is_file()  # the pickle that could leak
    out, err = capfd.readouterr()
    assert "me/at-end" in out and TOKEN not in out + err
    assert_token_absent(TOKEN, run)


def assert_token_absent(token: str, folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.parent.name == "upload" for p in files)
    leaked = [str(p) for p in files if token.encode() in p.read_bytes()]
    assert not leaked, f"token written to {leaked}"


def test_hub_errors_become_one_line(runs, monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from finetune import hub
    from finetune.errors import FinetuneError

    class RejectingApi:
        def create_repo(self, *args, **kwargs):
            response = httpx2.Response(401, request=httpx2.Request("POST", "https://hf.co/x"))
            raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    with pytest.raises(FinetuneError, match="rejected the token") as caught:
        hub.push(runs["full"], "me/test", token=TOKEN, api=RejectingApi(), log=lambda m: None)
    assert "\n" not in str(caught.value) and TOKEN not in str(caught.value)


def _rebase(run: Path, dest: Path, name: str) -> Path:
    """A copy of a LoRA run whose recipe names another base (as if trained from `name`)."""
    import yaml

    copy = Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("upload", "base")))
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["model"].update(name=name, architecture=None)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return copy


def test_lora_on_a_hub_base_uploads_the_adapter_alone(tmp_path, runs, capsys, no_network):
    from huggingface_hub import ModelCard

    run = _rebase(runs["lora"], tmp_path / "run", "openai-community/gpt2")
    folder = dry_run(capsys, run)
    assert not any(name.startswith("base/") for name in files_of(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "openai-community/gpt2"
    check_card(folder, "peft", base_model="openai-community/gpt2", family=None)
    card = ModelCard.load(folder / "README.md")
    assert 'from_pretrained("openai-community/gpt2")' in card.text

    # Merging needs the base's weights; a dry run will not download them.
    assert run_cli("push", run, "--repo-id", "me/test", "--merged", "--dry-run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not in the local hub cache" in err


def test_full_run_from_a_hub_model_names_it_as_base_model(tmp_path, runs, capsys, no_network):
    from transformers import pipeline

    run = _rebase(runs["full"], tmp_path / "run", "openai-community/gpt2")
    folder = dry_run(capsys, run)
    check_no_pickles(folder)
    check_card(folder, "transformers", base_model="openai-community/gpt2")
    assert "trained-from-scratch" not in (folder / "README.md").read_text()
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    assert generator("Maya:", max_new_tokens=3, do_sample=False)[0]["generated_text"]


def test_lora_on_a_local_base_carries_it(tmp_path, runs, capsys, no_network):
    run = _rebase(runs["lora"], tmp_path / "run", str(runs["full"]))
    folder = dry_run(capsys, run)
    assert {"base/config.json", "base/model.safetensors"} <= files_of(folder)
    base_weights = (folder / "base" / "model.safetensors").read_bytes()
    assert base_weights == (runs["full"] / "model.safetensors").read_bytes()
    check_card(folder, "peft")
