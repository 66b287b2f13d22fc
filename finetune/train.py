"""`finetune train`: recipe -> model and tokenizer -> (LoRA) -> datasets -> Trainer -> train -> save.

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

from finetune import data as data_lib
from finetune import model as model_lib
from finetune.config import Recipe
from finetune.errors import FinetuneError
from finetune.plots import write_plots
from finetune.samples import sample_callbacks

STAGING = ".staging"  # final files are written here, then moved into the run folder


def train(recipe: Recipe, overwrite: bool = False) -> dict:
    from transformers import Trainer, default_data_collator, set_seed

    args = training_arguments(recipe)
    resume = resume_checkpoint(recipe, args, overwrite)
    config = model_lib.resolve_config(recipe.model)
    check_block_size(recipe, config)
    set_seed(args.seed)

    with args.main_process_first(desc="preparing data"):
        tokenizer = build_tokenizer(recipe, args)
        prepared = data_lib.prepare(recipe.data, tokenizer, args.seed,
                                    progress=args.process_index == 0)
    data_lib.check_blocks(prepared, recipe.data.block_size)
    log(args, _data_summary(prepared, recipe.data.block_size))

    model = model_lib.load_model(recipe, config, tokenizer)
    # GPT-2's class name hides its loss type; without it the Trainer counts each block's first
    # token as predicted and reports eval_loss (and perplexity) too low by a factor (block-1)/block.
    model.loss_type = model.loss_type or "ForCausalLM"
    if recipe.lora.enabled:
        if recipe.model.architecture and args.process_index == 0:
            _save_base(model, tokenizer, args.output_dir)  # so the adapter loads anywhere
        from finetune.lora import apply_lora

        model = apply_lora(model, recipe.lora, log=lambda m: log(args, m))

    block = recipe.data.block_size
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data_lib.BlockDataset(prepared.train.blocks(block)),
        eval_dataset=data_lib.BlockDataset(prepared.validation.blocks(block)),
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=sample_callbacks(recipe, tokenizer, resumed=resume is not None),
    )
    before = trainer.evaluate(metric_key_prefix="eval")["eval_loss"]
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    after = trainer.evaluate(metric_key_prefix="eval")["eval_loss"]

    metrics = {
        "eval_loss_before": before,
        "perplexity_before": _perplexity(before),
        "eval_loss": after,
        "perplexity": _perplexity(after),
        "train_loss": result.training_loss,
        "global_step": result.global_step,
        "train_tokens": int(trainer.state.num_input_tokens_seen),
        "train_seconds": round(seconds, 3),
        "train_tokens_per_second": round(trainer.state.num_input_tokens_seen / seconds, 1),
        "world_size": args.world_size,
        "data": prepared.stats(block),
    }
    save_run(trainer, recipe, metrics)
    if trainer.is_world_process_zero():
        write_plots(args.output_dir, trainer.state.log_history, metrics)
    log(args, f"perplexity {metrics['perplexity_before']:.2f} -> {metrics['perplexity']:.2f}; "
              f"run saved to {args.output_dir}")
    if recipe.hub.push == "end" and trainer.is_world_process_zero():
        from finetune.hub import push_at_end

        push_at_end(recipe)
    return metrics


# --------------------------------------------------------------------------- helpers


def training_arguments(recipe: Recipe):
    """TrainingArguments from `training:`, with bf16 on GPUs that support it unless set."""
    import torch
    from transformers import TrainingArguments

    values = dict(recipe.training)
    values.setdefault("include_num_input_tokens_seen", "all")
    values.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    values.pop("hub_token", None)  # checkpoints pickle the arguments; hub.push_at_end reads it
    if values.get("fp16") and not torch.cuda.is_available():
        raise FinetuneError("training.fp16 needs a CUDA GPU; remove it (CPU trains in fp32)")
    if (recipe.model.dtype in ("auto", "bfloat16") and model_lib.bf16_supported()
            and "bf16" not in values and "fp16" not in values):
        values["bf16"] = True
    return TrainingArguments(**values)


def resume_checkpoint(recipe: Recipe, args, overwrite: bool) -> str | None:
    """The checkpoint to resume from; refuse to write into a finished or foreign run folder."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(args.output_dir)
    setting = recipe.training.get("resume_from_checkpoint")
    if setting == "auto":
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
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


def build_tokenizer(recipe: Recipe, args):
    """Load the tokenizer, or train one on the training corpus (cached by corpus and size)."""
    spec = recipe.tokenizer
    if spec.train_vocab_size is None:
        return model_lib.load_tokenizer(spec, recipe.model)
    from transformers import AutoTokenizer

    from finetune import corpus

    source = corpus.resolve(recipe.data.train, "data.train")
    key = f"{source.fingerprint()[:20]}-{spec.train_vocab_size}-{recipe.data.text_column}"
    path = data_lib.cache_root(recipe.data) / "tokenizers" / key
    if not (path / "tokenizer.json").is_file():
        docs = corpus.read_documents(source, recipe.data.text_column, recipe.data.encoding)
        log(args, f"training a {spec.train_vocab_size}-token BPE tokenizer on {source.spec}")
        tokenizer = model_lib.train_tokenizer(docs, spec.train_vocab_size)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return model_lib.finish_tokenizer(AutoTokenizer.from_pretrained(str(path)))


def _save_base(model, tokenizer, output_dir: str) -> None:
    staging = Path(output_dir) / STAGING / model_lib.BASE_SUBDIR
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def save_run(trainer, recipe: Recipe, metrics: dict) -> None:
    """Write the final files into a staging folder, then move them in; metrics.json goes last."""
    out = Path(trainer.args.output_dir)
    staging = out / STAGING
    trainer.save_model(str(staging))  # every rank takes part (FSDP gathers); rank 0 writes
    if not trainer.is_world_process_zero():
        return
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml says it all
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
    return (f"data ({source}): train {t['documents']} documents, {t['tokens']:,} tokens, "
            f"{t['blocks']} blocks of {block_size}; validation {v['documents']} documents, "
            f"{v['tokens']:,} tokens, {v['blocks']} blocks")


def log(args, message: str) -> None:
    if args.process_index == 0:
        print(message, flush=True)
