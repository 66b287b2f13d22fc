"""Trainer callbacks that keep finished work safe: Ctrl-C saves a checkpoint, a NaN loss stops."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from finetune.errors import Diverged, Interrupted


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the step, save a checkpoint, stop. A second one aborts at once."""

    def __init__(self):
        self.requested: float = 0.0  # when the first Ctrl-C came (monotonic), 0 if none
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        # A wrapper (timeout, a launcher) may forward the terminal's SIGINT a second time at
        # once; only a deliberate second Ctrl-C, a moment later, aborts without saving.
        if self.requested and time.monotonic() - self.requested > 2:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = time.monotonic()
        print(
            "\nfinetune: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)",
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class NonFiniteLossCallback(TrainerCallback):
    """Stop at the first logged NaN/inf loss, without saving the broken weights."""

    def __init__(self):
        self.bad_step: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_step = state.global_step
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint: Trainer writes trainer_state.json last, so a folder
    without it was cut off mid-save (a crash, SIGKILL) and is skipped."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [
        p
        for p in folder.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return str(max(found, key=lambda p: int(p.name.split("-")[-1]))) if found else None


def raise_if_stopped(
    interrupt: InterruptCallback, nonfinite: NonFiniteLossCallback, output_dir: str, step: int
) -> None:
    """After trainer.train(): turn a stop requested by a guard into its error."""
    if nonfinite.bad_step is not None:
        good = last_checkpoint(output_dir)
        raise Diverged(
            f"the loss became NaN or infinite by step {nonfinite.bad_step}; last good checkpoint: "
            f"{good or 'none'} (lower training.learning_rate, or use bf16 instead of fp16)"
        )
    if interrupt.requested:
        raise Interrupted(
            f"interrupted at step {step}; checkpoint saved in {last_checkpoint(output_dir)}; "
            "resume with training.resume_from_checkpoint=auto"
        )
