"""Trainer callbacks that keep finished work safe: Ctrl-C saves a checkpoint, a NaN loss stops."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from finetune.errors import Diverged, Interrupted


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the step, save a checkpoint, stop. A second one aborts at once.

    Under a launcher each rank gets its own signal, maybe a step apart or not at all (one
    worker's pid signalled): the ranks agree every step, so all stop and save at the same step."""

    def __init__(self):
        self.requested: float = 0.0  # when the first Ctrl-C came (monotonic), 0 if none
        self._previous = None
        self._announces = True  # the main process tells the user; other ranks stay quiet
        self._flag = None  # a one-element CPU tensor the ranks all-reduce; None with one process
        self._group = None  # the gloo process group that reduces it

    def on_train_begin(self, args, state, control, **kwargs):
        self._announces = state.is_world_process_zero
        self._flag, self._group = _distributed_flag()
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        # A wrapper (timeout, a launcher) may forward the terminal's SIGINT a second time at
        # once; only a deliberate second Ctrl-C, a moment later, aborts without saving.
        if self.requested and time.monotonic() - self.requested > 2:
            raise KeyboardInterrupt
        if not self.requested:
            self._request()

    def _request(self) -> None:
        self.requested = time.monotonic()
        if self._announces:
            print(
                "\nfinetune: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)",
                flush=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self._flag is not None:
            import torch.distributed as dist

            # Decide on the reduced value only: a signal landing during the all-reduce counts
            # at the next step, on every rank alike.
            self._flag.fill_(1 if self.requested else 0)
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
            stop = bool(self._flag.item())
            if stop and not self.requested:
                self._request()
        else:
            stop = bool(self.requested)
        if stop:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _distributed_flag():
    """(a CPU zero, the gloo group to all-reduce it in) when several processes train together;
    (None, None) otherwise, so one process pays nothing.

    Always a CPU tensor over gloo, also when training runs on NCCL: reading a CUDA tensor's value
    every step would wait for the GPU to finish the step's queued work, stalling the pipeline."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None, None
    # Every rank reaches on_train_begin, so every rank creates the group, as new_group requires.
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return torch.zeros(1, dtype=torch.int32), group


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
