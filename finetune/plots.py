"""Plots of a finished run: RUN/plots/loss.png and RUN/plots/perplexity.png.

Figures are built on matplotlib's object API with the Agg canvas (no display, no pyplot state), so
they work on servers and inside training. The log history behind them is kept as
RUN/plots/history.json, which the evaluation notebook redraws from.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

PLOTS_SUBDIR = "plots"
HISTORY_FILE = "history.json"


def write_plots(run: str | Path, log_history: list[dict], metrics: dict) -> list[Path]:
    """Write the history and both figures into RUN/plots; returns the PNG paths."""
    folder = Path(run) / PLOTS_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    history = with_initial_eval(log_history, metrics)
    (folder / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    paths = []
    for name, figure in (
        ("loss.png", loss_figure(history)),
        ("perplexity.png", perplexity_figure(metrics["perplexity_before"], metrics["perplexity"])),
    ):
        figure.savefig(folder / name, dpi=120)
        paths.append(folder / name)
    return paths


def with_initial_eval(log_history: list[dict], metrics: dict) -> list[dict]:
    """The Trainer forgets the evaluation made before training; put it back at step 0."""
    history = [dict(entry) for entry in log_history]
    has_start = any(e.get("step") == 0 and "eval_loss" in e for e in history)
    if not has_start and "eval_loss_before" in metrics:
        history.insert(0, {"step": 0, "eval_loss": metrics["eval_loss_before"]})
    return history


def read_history(run: str | Path) -> list[dict]:
    """A run's log history: RUN/plots/history.json, else its latest checkpoint's trainer state."""
    run = Path(run)
    saved = run / PLOTS_SUBDIR / HISTORY_FILE
    if saved.is_file():
        return json.loads(saved.read_text())
    states = sorted(
        run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    return json.loads(states[-1].read_text())["log_history"] if states else []


def loss_figure(history: list[dict]):
    """Training and evaluation loss against the optimizer step."""
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = sorted(
        {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e and "step" in e}.items()
    )
    figure, axes = _figure()
    if train:
        axes.plot(*zip(*train, strict=True), marker=".", label="training loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), marker="o", label="evaluation loss")
    if not train and not evals:
        axes.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=axes.transAxes)
    axes.set_title("Training and evaluation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    if train or evals:
        axes.legend()
    return figure


def perplexity_figure(
    before: float, after: float, labels: tuple[str, str] = ("before (base)", "after (tuned)")
):
    """Validation perplexity before and after fine-tuning, as two labelled bars."""
    figure, axes = _figure(width=5)
    bars = axes.bar(labels, [before, after], color=["#999999", "#1f77b4"])
    axes.bar_label(bars, fmt="%.2f")
    axes.set_title("Validation perplexity before and after fine-tuning")
    axes.set_xlabel("model")
    axes.set_ylabel("perplexity (lower is better)")
    axes.margins(y=0.15)
    return figure


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes (for IPython.display.Image in the notebook)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _figure(width: float = 7, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="tight")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()
