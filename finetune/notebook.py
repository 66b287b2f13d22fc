"""`python -m finetune.notebook RUN`: execute notebooks/evaluate.ipynb headless against a run.

The run folder reaches the notebook through the FINETUNE_RUN environment variable, read in its
parameter cell. The executed notebook and its HTML export are written to RUN/evaluate.ipynb and
RUN/evaluate.html. The helpers below keep the notebook's cells short; they need no network, and
a base model that would have to be downloaded is reported and skipped.
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path

from finetune.errors import FinetuneError

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "evaluate.ipynb"
RUN_VARIABLE = "FINETUNE_RUN"


def execute(run: str | Path, notebook: Path = NOTEBOOK, timeout: int = 600) -> tuple[Path, Path]:
    """Run every cell with the run folder as parameter; returns (executed .ipynb, .html)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    run = Path(run)
    if not run.is_dir():
        raise FinetuneError(f"run folder not found: {run} (usage: make notebook RUN=runs/NAME)")
    if not (run / "recipe.yaml").is_file():
        raise FinetuneError(f"{run} has no recipe.yaml: the notebook evaluates a finished run")
    if not notebook.is_file():
        raise FinetuneError(f"notebook not found: {notebook}")
    nb = nbformat.read(notebook, as_version=4)
    env = {**os.environ, RUN_VARIABLE: str(run.resolve()), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
        resources={"metadata": {"path": os.getcwd()}},
    )
    executed, exported = run / "evaluate.ipynb", run / "evaluate.html"
    try:
        client.execute(env=env)
    except CellExecutionError as exc:
        nbformat.write(nb, executed)  # keep the partial notebook: it shows the failing cell
        summary = str(exc).strip().splitlines()[-1] if str(exc).strip() else "a cell failed"
        raise RuntimeError(f"notebook cell failed: {summary}; see {executed}") from None
    nbformat.write(nb, executed)
    body, _ = HTMLExporter().from_notebook_node(nb)
    exported.write_text(body, encoding="utf-8")
    return executed, exported


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(
            "usage: python -m finetune.notebook RUN   (or: make notebook RUN=runs/NAME)",
            file=sys.stderr,
        )
        return 2
    try:
        executed, exported = execute(args[0])
    except FinetuneError as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"finetune: {exc}", file=sys.stderr)
        return 1
    print(f"executed notebook: {executed}\nHTML export: {exported}")
    return 0


# --------------------------------------------------------------------------- notebook helpers


def quiet() -> None:
    """No progress bars or library chatter in the notebook's outputs."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def try_load_base(run: str | Path):
    """(base LanguageModel or None, a sentence saying which model it is or why it is skipped)."""
    from finetune.api import load_base

    try:
        base = load_base(run)
    except FinetuneError as exc:
        return None, f"base model unavailable, so the comparison is skipped: {exc}"
    return base, f"base model: {base.name}"


def perplexity_table(run: str | Path, metrics: dict) -> tuple[str, float, float]:
    """A Markdown table of perplexity before/after (as recorded, and re-evaluated now).

    Returns (table, before, after); before and after prefer the re-evaluated figures.
    """
    from finetune.evaluate import evaluate

    notes, now = [], {}
    try:
        now = evaluate(run, base=True)
    except FinetuneError as exc:
        notes.append(f"The base model was not re-evaluated: {exc}")
        try:
            now = evaluate(run)
        except FinetuneError as exc:
            notes.append(f"The tuned model was not re-evaluated: {exc}")

    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "n/a"

    rows = [
        ("before (base model)", metrics.get("perplexity_before"), now.get("base_perplexity")),
        ("after (tuned run)", metrics.get("perplexity"), now.get("perplexity")),
    ]
    lines = [
        "| model | perplexity at training (metrics.json) | re-evaluated (`finetune eval`) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {cell(recorded)} | {cell(fresh)} |" for name, recorded, fresh in rows]
    if now:
        lines.append(f"\n{now['tokens']:,} tokens of {now['data']}, window {now['window']}.")
    lines += [f"\n{note}" for note in notes]
    before = now.get("base_perplexity", metrics.get("perplexity_before"))
    after = now.get("perplexity", metrics.get("perplexity"))
    return "\n".join(lines), before, after


def held_out_passages(run: str | Path, tokenizer, count: int = 3, tokens: int = 48) -> list[str]:
    """A few passages of the run's validation text (empty when it cannot be rebuilt here)."""
    from finetune.evaluate import run_recipe, validation_tokens

    try:
        ids = validation_tokens(Path(run), run_recipe(Path(run)), tokenizer)
    except FinetuneError:
        return []
    step = max(tokens, len(ids) // count)
    passages = [
        tokenizer.decode(ids[i : i + tokens].tolist(), skip_special_tokens=True).strip()
        for i in range(0, len(ids) - tokens + 1, step)
    ][:count]
    return [p for p in passages if p]


def opening_words(passages: list[str], words: int = 4) -> list[str]:
    """Prompts for a recipe without eval.prompts: the opening words of held-out passages."""
    prompts = [" ".join(p.split()[:words]) for p in passages if p.split()]
    return prompts or ["The", "Once upon a time"]


def side_by_side(prompts: list[str], columns: dict[str, list[str]]) -> str:
    """An HTML table: one row per prompt, one column per model."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    rows = []
    for i, prompt in enumerate(prompts):
        cells = "".join(
            f"<td style='white-space:pre-wrap;text-align:left'>{html.escape(texts[i])}</td>"
            for texts in columns.values()
        )
        rows.append(f"<tr><td><b>{html.escape(prompt)}</b></td>{cells}</tr>")
    return f"<table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"


def similarity_table(model, texts: list[str]) -> str:
    """A Markdown matrix of cosine similarities between the texts' embeddings."""
    import numpy as np

    vectors = np.array(model.embed(texts))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    matrix = unit @ unit.T
    short = [t if len(t) <= 30 else t[:27] + "..." for t in texts]
    lines = [
        "| | " + " | ".join(f"{i + 1}" for i in range(len(texts))) + " |",
        "| --- |" + " ---: |" * len(texts),
    ]
    for i, name in enumerate(short):
        values = " | ".join(f"{matrix[i, j]:.3f}" for j in range(len(texts)))
        lines.append(f"| {i + 1}. {name.replace('|', '/')} | {values} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
