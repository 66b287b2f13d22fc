"""Samples during training: at every evaluation, fixed-seed generations for each `eval.prompts`.

They go to RUN/samples.jsonl as {"step", "prompt", "text"} lines (main process only) and, when
`training.report_to` includes tensorboard, to TensorBoard's text tab under RUN/runs/samples.
The seed and settings stay fixed, so successive entries show what training changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback

from finetune.config import EvalSpec
from finetune.errors import FinetuneError
from finetune.generate import check_settings, sample

SAMPLES_FILE = "samples.jsonl"


class SamplesCallback(TrainerCallback):
    def __init__(self, spec: EvalSpec, tokenizer, output_dir: str | Path, append: bool = False):
        self.spec = spec
        self.tokenizer = tokenizer
        self.path = Path(output_dir) / SAMPLES_FILE
        self.append = append  # a resumed run adds to its file; a fresh run starts a new one
        self.steps_done = _steps_in(self.path) if append else set()  # resumed: no repeats
        self.writer = None

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step in self.steps_done:
            return  # the final evaluation repeats the last one's step: same weights, same text
        self.steps_done.add(state.global_step)
        spec = self.spec
        # Every rank generates (a sharded model needs all of them); only the main one writes.
        texts = sample(
            model,
            self.tokenizer,
            spec.prompts,
            max_new_tokens=spec.max_new_tokens,
            temperature=spec.temperature,
            top_k=spec.top_k,
            top_p=spec.top_p,
            seed=spec.seed,
        )
        if not state.is_world_process_zero:
            return
        records = [
            {"step": state.global_step, "prompt": p, "text": t[0]}
            for p, t in zip(spec.prompts, texts, strict=True)
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a" if self.append else "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.append = True
        if "tensorboard" in (args.report_to or []):
            self._log_tensorboard(args, records)

    def _log_tensorboard(self, args, records: list[dict]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            root = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(
                args.output_dir, "runs"
            )
            self.writer = SummaryWriter(log_dir=os.path.join(root, "samples"))
        for number, record in enumerate(records, start=1):
            body = f"**{_markdown(record['prompt'])}**{_markdown(record['text'])}"
            self.writer.add_text(f"samples/prompt_{number}", body, global_step=record["step"])
        self.writer.flush()


def _steps_in(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    steps = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            steps.add(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by an interrupted run
    return steps


def _markdown(text: str) -> str:
    # TensorBoard renders text as Markdown: keep the model's line breaks and literal characters.
    escaped = "".join("\\" + c if c in "\\`*_{}[]()#+-.!|<>" else c for c in text)
    return escaped.replace("\n", "  \n")


def sample_callbacks(recipe, tokenizer, resumed: bool) -> list[SamplesCallback]:
    """The samples callback for a recipe with `eval.prompts`; none without."""
    spec = recipe.eval
    if not spec.prompts:
        return []
    for number, prompt in enumerate(spec.prompts):
        if not prompt.strip():
            raise FinetuneError(f"eval.prompts[{number}] is empty; give each prompt some text")
    check_settings(spec.max_new_tokens, spec.temperature, spec.top_k, spec.top_p, prefix="eval.")
    return [SamplesCallback(spec, tokenizer, recipe.training["output_dir"], append=resumed)]
