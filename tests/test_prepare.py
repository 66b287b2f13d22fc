"""`finetune prepare`: tokenize once, then find the cache again without torch or transformers."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.prepare import DEFAULT_SEED, prepare_command

from .conftest import ROOT, SAMPLE, run_cli


@pytest.fixture
def setup(tmp_path, tokenizer):
    """A recipe naming a saved tokenizer folder and a two-document corpus, with its own cache."""
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    text = SAMPLE.read_text()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(text[: len(text) // 2])
    (tmp_path / "corpus" / "b.txt").write_text(text[len(text) // 2 :])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {architecture: gpt2}\n"
        f"tokenizer: {{name: {tmp_path / 'tokenizer'}}}\n"
        f"data: {{train: {tmp_path / 'corpus'}, validation_split: 0.5, block_size: 64,"
        f" cache_dir: {tmp_path / 'cache'}}}\n"
        "training: {seed: 3, not_a_trainer_field: 1}\n"  # training: is not prepare's business
    )
    return recipe


def _prepare(recipe: Path, *overrides: str) -> tuple[dict, list[str]]:
    lines: list[str] = []
    return prepare_command(str(recipe), list(overrides), echo=lines.append), lines


def test_second_run_reads_the_index_and_finds_the_same_entry(setup):
    first, lines = _prepare(setup)
    assert not first["from_cache"] and lines[0].startswith("data (tokenized): train 1 documents")
    assert lines[1] == f"cache: {first['cache_path']}"
    assert (Path(first["cache_path"]) / "meta.json").is_file()
    assert first["stats"]["train"]["tokens"] > 64 and first["stats"]["validation"]["documents"] == 1

    second, lines = _prepare(setup)
    assert second["from_index"] and second["from_cache"]
    assert lines[0].startswith("data (cached)")
    assert second["cache_path"] == first["cache_path"] and second["stats"] == first["stats"]


def test_a_changed_corpus_is_tokenized_again(setup):
    first, _ = _prepare(setup)
    corpus = setup.parent / "corpus" / "a.txt"
    corpus.write_text(corpus.read_text() + "\nMaya: one more line.")
    second, lines = _prepare(setup)
    assert not second["from_index"] and not second["from_cache"]
    assert second["cache_path"] != first["cache_path"]
    assert second["stats"]["train"]["tokens"] != first["stats"]["train"]["tokens"] or (
        second["stats"]["validation"]["tokens"] != first["stats"]["validation"]["tokens"]
    )


def test_same_bytes_rewritten_or_tokenizer_touched_falls_back_to_the_content_key(setup):
    first, _ = _prepare(setup)
    corpus = setup.parent / "corpus" / "b.txt"
    corpus.write_text(corpus.read_text())  # same content, new file identity
    second, lines = _prepare(setup)
    assert not second["from_index"] and second["from_cache"]
    assert second["cache_path"] == first["cache_path"] and lines[0].startswith("data (cached)")

    os.utime(setup.parent / "tokenizer" / "tokenizer.json", ns=(1, 1))
    third, _ = _prepare(setup)
    assert not third["from_index"] and third["cache_path"] == first["cache_path"]
    assert _prepare(setup)[0]["from_index"]


def test_settings_are_part_of_the_key(setup):
    first, _ = _prepare(setup)
    other, _ = _prepare(setup, "training.seed=4")
    assert not other["from_index"] and other["cache_path"] != first["cache_path"]


def test_cached_path_imports_neither_torch_nor_transformers(setup):
    assert run_cli("prepare", setup) == 0
    code = (
        "import sys\n"
        "from finetune.cli import main\n"
        f"assert main(['prepare', {str(setup)!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert "data (cached)" in done.stdout and "cache: " in done.stdout


def test_bad_input_is_one_line_exit_2(setup, capsys):
    assert run_cli("prepare", setup, "data.train=/nonexistent/corpus.txt") == 2
    assert run_cli("prepare", setup, "data.train=/nonexistent/elon-musk.txt") == 2
    assert run_cli("prepare", setup, "training.seed=soon") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "finetune: error: data.train: file not found: /nonexistent/corpus.txt (check the path)",
        "finetune: error: data.train: file not found: /nonexistent/elon-musk.txt (run `make data`)",
        "finetune: error: training.seed: expected an integer, got 'soon'",
    ]


def test_default_seed_is_the_trainers():
    from transformers import TrainingArguments

    fields = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    assert DEFAULT_SEED == fields["seed"]
