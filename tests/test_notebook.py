"""The evaluation notebook, executed headless against a tiny run, and its offline fallbacks."""

import shutil
import subprocess
import sys

import nbformat
import pytest

from finetune import notebook

from .conftest import ROOT


def _copy_run(run, target):
    # The notebook writes into the run folder; the session's runs are shared read-only.
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoint-*"))
    return target


@pytest.mark.slow
def test_notebook_executes_against_a_tiny_run(full_run, tmp_path):
    run = _copy_run(full_run, tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "finetune.notebook", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    nb = nbformat.read(run / "evaluate.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    text = "".join(o.get("text", "") for o in outputs)
    assert str(run) in text, "the parameter cell reads FINETUNE_RUN"
    assert "seed 0 again, identical: True" in text
    assert (run / "evaluate.html").read_text().lstrip().lower().startswith("<!doctype html")


def test_hub_base_out_of_reach_is_reported_and_skipped(full_run, tmp_path):
    run = _copy_run(full_run, tmp_path / "run")
    recipe = (run / "recipe.yaml").read_text()
    hub_base = "  name: finetune-tests/not-cached\n  architecture: null"
    recipe = recipe.replace("  name: null\n  architecture: gpt2", hub_base)
    (run / "recipe.yaml").write_text(recipe)
    base, note = notebook.try_load_base(run)
    assert base is None and "unavailable" in note and "hub" in note
    table, before, after = notebook.perplexity_table(run, {"perplexity_before": 900.0})
    assert "The base model was not re-evaluated" in table and "n/a" in table
    assert before == 900.0 and after > 1  # the tuned model is still re-evaluated


@pytest.mark.parametrize(
    "make_args", [lambda tmp: [], lambda tmp: [str(tmp / "missing")], lambda tmp: [str(tmp)]]
)
def test_bad_run_exits_2(tmp_path, capsys, make_args):
    assert notebook.main(make_args(tmp_path)) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_helpers_render_tables():
    html = notebook.side_by_side(["<p>"], {"base": ["a & b"], "tuned": ["c"]})
    assert "&lt;p&gt;" in html and "a &amp; b" in html and html.count("<tr>") == 2
    assert notebook.opening_words(["Maya: Welcome back to the show"]) == ["Maya: Welcome back to"]
    assert notebook.opening_words([]) == ["The", "Once upon a time"]
