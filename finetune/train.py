"""`finetune train`: recipe -> model, tokenizer -> (LoRA) -> datasets -> Trainer -> train -> save.

Rank-agnostic: the launcher (accelerate, torchrun) owns distribution; data is prepared on the main
process first and only the main process writes files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from finetune import data as data_lib
from finetune import fast, guards, hub, packing, vocab
from finetune import model as model_lib
from finetune.config import Recipe
from finetune.errors import FinetuneError
from finetune.plots import write_plots
from finetune.samples import sample_callbacks

STAGING = ".staging"  # final files are written here, then moved into the run folder


def train(recipe: Recipe, overwrite: bool = False) -> dict:
    from transformers import default_data_collator, set_seed

    args = training_arguments(recipe)
    check_reporting(args)
    resume = resume_checkpoint(recipe, args, overwrite)
    config = model_lib.resolve_config(recipe.model)
    check_block_size(recipe, config)
    fast.check(recipe)
    hub.preflight(recipe)  # `hub.push: end` without a token fails now, not after training
    set_seed(args.seed)

    with args.main_process_first(desc="preparing data"):
        tokenizer = model_lib.build_tokenizer(recipe, log=lambda m: log(args, m))
        prepared = data_lib.prepare(
            recipe.data, tokenizer, args.seed, progress=args.process_index == 0
        )
    data_lib.check_blocks(prepared, recipe.data.block_size, not recipe.data.validation)
    log(args, _data_summary(prepared, recipe.data.block_size))

    model = model_lib.load_model(recipe, config, tokenizer)
    if recipe.lora.enabled:
        model = with_lora(model, recipe, tokenizer, args)
    model = fast.apply(model, recipe, log=lambda m: log(args, m))

    before = BeforeTraining(args, resume)  # sets eval_on_start: see why in its docstring
    trainer = fast.trainer_class()(
        model=model,
        args=args,
        train_dataset=packing.block_dataset(prepared.train, recipe.data),
        eval_dataset=packing.block_dataset(prepared.validation, recipe.data),
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[
            *sample_callbacks(recipe, tokenizer, resumed=resume is not None),
            interrupt := guards.InterruptCallback(),
            nonfinite := guards.NonFiniteLossCallback(),
            before,
        ],
    )
    _tensorboard_into_run(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = before.seconds_since_start()
    guards.raise_if_stopped(interrupt, nonfinite, args.output_dir, result.global_step)
    after = trainer.evaluate(metric_key_prefix="eval")["eval_loss"]

    metrics = run_metrics(
        trainer, result, before.loss, after, seconds, prepared.stats(recipe.data.block_size)
    )
    save_run(trainer, recipe, metrics)
    if trainer.is_world_process_zero():
        write_plots(args.output_dir, trainer.state.log_history, metrics)
    log(
        args,
        f"perplexity {metrics['perplexity_before']:.2f} -> {metrics['perplexity']:.2f}; "
        f"run saved to {args.output_dir}",
    )
    if recipe.hub.push == "end" and trainer.is_world_process_zero():
        hub.push_at_end(recipe)
    return metrics


# --------------------------------------------------------------------------- helpers


def _tensorboard_into_run(trainer) -> None:
    """TensorBoard's events go to RUN/runs, the folder the docs name (left to itself, the
    callback picks a dated folder, or ./runs for an event logged before training starts)."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback" and callback.logging_dir is None:
            callback.logging_dir = str(Path(trainer.args.output_dir) / "runs")


class BeforeTraining(TrainerCallback):
    """The validation loss before the first step, and when training proper started.

    Measured by Trainer's `eval_on_start`, inside train(), once the launcher's wrapping (DDP) is
    in place: an evaluate() call before train() leaves the model unwrapped under transformers 5,
    and each process then trains its own copy without sharing gradients. A resumed run reads the
    loss from its checkpoint rather than evaluating the checkpoint.
    """

    def __init__(self, args, resume: str | None):
        self.loss = logged_loss_before(resume) if resume else None
        args.eval_on_start = self.loss is None
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.loss is None and metrics and "eval_loss" in metrics:
            self.loss = metrics["eval_loss"]
            self.started = time.perf_counter()  # the evaluation is not training time

    def seconds_since_start(self) -> float:
        return time.perf_counter() - self.started


def logged_loss_before(checkpoint: str) -> float | None:
    """The validation loss the run logged before its first step, from a checkpoint's state."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    for entry in state.get("log_history", []):
        if entry.get("step") == 0 and "eval_loss" in entry:
            return entry["eval_loss"]
    return None


def with_lora(model, recipe: Recipe, tokenizer, args):
    """Wrap the model with LoRA; a random-init base is saved first so the adapter loads anywhere."""
    from finetune.lora import apply_lora, target_modules

    target_modules(model, recipe.lora)  # a bad target list fails before anything is written
    if recipe.model.architecture and args.process_index == 0:
        _save_base(model, tokenizer, args.output_dir)
    if recipe.model.quantization:
        from finetune.quantize import prepare_for_lora

        model = prepare_for_lora(model, args)
    return apply_lora(model, recipe.lora, log=lambda m: log(args, m))


def run_metrics(trainer, result, before: float, after: float, seconds: float, data: dict) -> dict:
    """What metrics.json records: validation loss before and after, throughput, data, machine."""
    from finetune.card import environment

    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "eval_loss_before": before,
        "perplexity_before": _perplexity(before),
        "eval_loss": after,
        "perplexity": _perplexity(after),
        "train_loss": result.training_loss,
        "global_step": result.global_step,
        "train_tokens": tokens,
        "train_seconds": round(seconds, 3),
        "train_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "world_size": trainer.args.world_size,
        "data": data,
        "environment": environment(),
    }


def training_arguments(recipe: Recipe):
    """TrainingArguments from `training:`, with bf16 on GPUs that support it unless set."""
    import torch
    from transformers import TrainingArguments

    values = dict(recipe.training)
    values.setdefault("logging_nan_inf_filter", False)  # a NaN loss must reach the guard
    values.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    values.pop("hub_token", None)  # checkpoints pickle these arguments: never a token
    values = fast.training_defaults(recipe, values)  # tf32, fused AdamW, workers... on a GPU
    if values.get("fp16") and not torch.cuda.is_available():
        raise FinetuneError("training.fp16 needs a CUDA GPU; remove it (CPU trains in fp32)")
    if (
        recipe.model.dtype in ("auto", "bfloat16")
        and model_lib.bf16_supported()
        and "bf16" not in values
        and "fp16" not in values
    ):
        values["bf16"] = True
    return TrainingArguments(**values)


def check_reporting(args) -> None:
    """`training.report_to` names only installed integrations (Trainer fails later otherwise)."""
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    missing = [name for name in args.report_to if name not in (*available, "all", "none")]
    if missing:
        how = "pip install 'finetune[tensorboard]'" if missing == ["tensorboard"] else "install it"
        raise FinetuneError(
            f"training.report_to: {', '.join(missing)} is not installed here; {how}, or remove "
            "it from training.report_to"
        )


def resume_checkpoint(recipe: Recipe, args, overwrite: bool) -> str | None:
    """The checkpoint to resume from; refuse to write into a finished or foreign run folder."""
    out = Path(args.output_dir)
    setting = recipe.training.get("resume_from_checkpoint")
    if setting == "auto":
        last = guards.last_checkpoint(str(out))
        if last is None:
            log(args, f"no checkpoint in {out} yet: starting from scratch")
        return last
    if setting:
        if not Path(setting).is_dir():
            raise FinetuneError(f"training.resume_from_checkpoint: no checkpoint folder {setting}")
        return setting
    if out.is_dir() and any(p.name != STAGING for p in out.iterdir()) and not overwrite:
        raise FinetuneError(
            f"the output folder {out} is not empty: choose another training.output_dir, resume "
            "with training.resume_from_checkpoint=auto, or pass --overwrite"
        )
    return None


def check_block_size(recipe: Recipe, config) -> None:
    limit = model_lib.context_length(config)
    if recipe.data.block_size > limit:
        raise FinetuneError(
            f"data.block_size {recipe.data.block_size} is beyond the model's context of {limit} "
            f"tokens; set data.block_size={limit} or less"
        )


def _save_base(model, tokenizer, output_dir: str) -> None:
    staging = Path(output_dir) / STAGING / model_lib.BASE_SUBDIR
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def save_run(trainer, recipe: Recipe, metrics: dict) -> None:
    """Write the final files into a staging folder, then move them in; metrics.json goes last."""
    out = Path(trainer.args.output_dir)
    staging = out / STAGING
    vocab.unpad(trainer.accelerator.unwrap_model(trainer.model))  # the saved model is standard
    trainer.save_model(str(staging))  # every rank takes part (FSDP gathers); rank 0 writes
    if not trainer.is_world_process_zero():
        return
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml says it all
    (staging / "README.md").unlink(missing_ok=True)  # PEFT's blank card; `finetune push` writes one
    (staging / "recipe.yaml").write_text(recipe.to_yaml())
    adapter_config = staging / "adapter_config.json"
    if adapter_config.is_file() and (staging / model_lib.BASE_SUBDIR).is_dir():
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = str((out / model_lib.BASE_SUBDIR).resolve())
        adapter_config.write_text(json.dumps(config, indent=2))
    for item in sorted(staging.iterdir()):
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _data_summary(prepared, block_size: int) -> str:
    stats = prepared.stats(block_size)
    t, v = stats["train"], stats["validation"]
    source = "cached" if prepared.from_cache else "tokenized"
    return (
        f"data ({source}): train {t['documents']} documents, {t['tokens']:,} tokens, "
        f"{t['blocks']} blocks of {block_size}; validation {v['documents']} documents, "
        f"{v['tokens']:,} tokens, {v['blocks']} blocks"
    )


def log(args, message: str) -> None:
    if args.process_index == 0:
        print(message, flush=True)
