"""`finetune check`: a preflight that catches mistakes before the first step, loading no weights.

It validates every block (`training:` by building TrainingArguments), reads the model config and
tokenizer where they are available offline, scans the data, counts steps, builds the model on the
meta device to count parameters and LoRA matches, estimates peak memory and warns about risky
settings. It writes nothing but the tokenized-data cache that training would write anyway.
"""

from __future__ import annotations

import json
import math
import os

from finetune import corpus
from finetune.config import Recipe, load_recipe
from finetune.errors import FinetuneError

HUB_HINT = "Hugging Face hub"


def check(path: str, overrides: list[str], as_json: bool = False) -> dict:
    recipe = load_recipe(path, overrides)
    report: dict = {
        "recipe": path,
        "output_dir": str(recipe.output_dir),
        "warnings": [],
        "needs_hub": [],
    }
    corpus.resolve(recipe.data.train, "data.train")
    if recipe.data.validation:
        corpus.resolve(recipe.data.validation, "data.validation")
    args = _training_args(recipe)
    config = _offline(report, "model config", lambda: _config(recipe))
    tokenizer = _offline(report, "tokenizer", lambda: _tokenizer(recipe))
    if tokenizer is not None:
        report["data"] = _scan_data(recipe, tokenizer, args)
    if config is not None:
        report["model"] = _model_report(recipe, config, tokenizer)
        report["speed"] = speed_settings(recipe, report["model"])
        report["memory_gib"] = estimate_memory(recipe, config, args, report["model"])
    report["warnings"] += _warnings(recipe, config, report.get("data"))
    report["warnings"] += _machine_warnings(recipe, args)
    print(json.dumps(report, indent=2) if as_json else _table(report))
    return report


def _offline(report: dict, what: str, load):
    """Run `load`; if it needs the unreachable hub, note that instead of failing."""
    try:
        return load()
    except FinetuneError as exc:
        if HUB_HINT not in str(exc):
            raise
        report["needs_hub"].append(what)
        return None


def _training_args(recipe: Recipe):
    from finetune.train import training_arguments

    return training_arguments(recipe)


def _config(recipe: Recipe):
    from finetune.model import resolve_config
    from finetune.train import check_block_size

    config = resolve_config(recipe.model)
    check_block_size(recipe, config)
    return config


def _tokenizer(recipe: Recipe):
    from finetune.model import build_tokenizer

    return build_tokenizer(recipe, log=lambda message: None)  # check prints its own table


def _scan_data(recipe: Recipe, tokenizer, args) -> dict:
    from finetune import data as data_lib

    prepared = data_lib.prepare(recipe.data, tokenizer, args.seed, progress=False)
    data_lib.check_blocks(prepared, recipe.data.block_size, not recipe.data.validation)
    stats = prepared.stats(recipe.data.block_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = args.per_device_train_batch_size * world
    batches = math.ceil(stats["train"]["blocks"] / per_step)
    steps_per_epoch = max(1, batches // args.gradient_accumulation_steps)
    total = (
        args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    )
    stats.update(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        processes=world,
        cache=str(prepared.cache_path),
    )
    return stats


def _model_report(recipe: Recipe, config, tokenizer) -> dict:
    """Parameters and LoRA matches from a model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.lora import projection_modules, target_modules

    if tokenizer is not None and recipe.model.architecture:
        config.vocab_size = len(tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    out = {
        "family": config.model_type,
        "context": int(config.max_position_embeddings),
        "layers": int(config.num_hidden_layers),
        "width": int(config.hidden_size),
        "vocab": int(config.vocab_size),
        "parameters": total,
        "trainable": total,
    }
    if recipe.lora.enabled:
        targets = target_modules(model, recipe.lora)
        matched = {
            n: m
            for n, m in model.named_modules()
            if n in projection_modules(model) and n.rsplit(".", 1)[-1] in targets
        }
        out["lora_modules"] = sorted(matched)
        out["trainable"] = sum(
            recipe.lora.r * (_in_out(m)[0] + _in_out(m)[1]) for m in matched.values()
        )
    return out


def _in_out(module) -> tuple[int, int]:
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)


def speed_settings(recipe: Recipe, model: dict) -> dict:
    """What `train` would switch on, here and (when this machine has none) on a CUDA GPU."""
    import torch

    from finetune.model import bf16_supported

    here = torch.cuda.is_available()
    out = {"here": _speed(recipe, model, here, here and bf16_supported())}
    if not here:
        out["cuda"] = _speed(recipe, model, True, True)  # Ampere or newer
    return out


def _speed(recipe: Recipe, model: dict, cuda: bool, bf16: bool) -> dict:
    from finetune import fast

    device = {"cuda": cuda, "capability": (9, 0) if cuda else (0, 0), "family": model["family"]}
    values = fast.training_defaults(recipe, dict(recipe.training), device=device)
    if values.get("fp16"):
        precision = "fp16"
    elif values.get("bf16", bf16 and recipe.model.dtype in ("auto", "bfloat16")):
        precision = "bf16"
    else:
        precision = "fp32"
    multiple = fast.pad_vocab_multiple(recipe, model["family"], cuda=cuda)
    return {
        "precision": precision,
        "tf32": bool(values.get("tf32")),
        "attention": recipe.speed.attention,
        "loss": fast.loss_kind(recipe, cuda=cuda),
        "optimizer": values.get("optim", "adamw_torch"),
        "compile": bool(values.get("torch_compile")),
        "vocab_rows": math.ceil(model["vocab"] / multiple) * multiple,
    }


def estimate_memory(recipe: Recipe, config, args, model: dict) -> dict:
    """Peak memory per device in GiB: weights, gradients, optimizer state, activations, logits.

    A planning figure (within ~30%), not a measurement: activations follow Korthikanti et al.
    (34·b·T·d + 5·b·h·T² bytes per layer at 16 bits), checkpointing keeps one layer input each.
    """
    from finetune.fast import loss_kind
    from finetune.loss import DEFAULT_CHUNK_SIZE
    from finetune.model import weights_dtype

    loss = loss_kind(recipe)
    dtype = weights_dtype(recipe.model.dtype, recipe.lora.enabled)
    weight_bytes = dtype.itemsize if hasattr(dtype, "itemsize") else 4
    mixed = bool(args.bf16 or args.fp16) or weight_bytes == 2
    act_bytes = 2 if mixed else 4
    b, t = args.per_device_train_batch_size, recipe.data.block_size
    d, layers = model["width"], model["layers"]
    heads = int(getattr(config, "num_attention_heads", 1))
    per_layer = (34 * b * t * d + 5 * b * heads * t * t) * act_bytes / 2
    checkpointing = bool(
        args.gradient_checkpointing or getattr(args, "activation_checkpointing", False)
    )
    activations = (
        (layers * b * t * d * act_bytes + per_layer) if checkpointing else (layers * per_layer)
    )
    gib = 1024**3
    parts = {
        "weights": model["parameters"] * weight_bytes / gib,
        "gradients": model["trainable"] * 4 / gib,
        "optimizer": model["trainable"] * 8 / gib,  # AdamW: two fp32 moments
        "activations": activations / gib,
        # Standard loss: the logits, their fp32 copy and its gradient, for every token; the
        # chunked and fused losses hold about one chunk of 1024 tokens' worth at a time.
        "logits": min(b * t, b * t if loss == "standard" else DEFAULT_CHUNK_SIZE)
        * model["vocab"]
        * (act_bytes + 4 + 4)
        / gib,
    }
    parts = {k: round(v, 3) for k, v in parts.items()}
    parts["total"] = round(sum(parts.values()), 2)
    return parts


def _warnings(recipe: Recipe, config, data: dict | None) -> list[str]:
    out = []
    family = config.model_type if config is not None else recipe.model.architecture
    if recipe.training.get("fp16") and family in ("gpt_neo", "gptj"):
        out.append(
            f"training.fp16 on {family} tends to overflow (inf/NaN loss); "
            "use training.bf16=true on GPUs that support it"
        )
    rate = recipe.training.get("learning_rate")
    high = 1e-2 if recipe.lora.enabled else 1e-3
    pretrained = recipe.model.name is not None  # training from scratch takes larger rates
    if pretrained and isinstance(rate, (int, float)) and rate > high:
        out.append(
            f"training.learning_rate {rate:g} is high for "
            f"{'LoRA' if recipe.lora.enabled else 'a full fine-tune'} of pretrained weights "
            f"(typical: {'1e-4 to 5e-4' if recipe.lora.enabled else '1e-5 to 1e-4'}); expect "
            "a diverging loss"
        )
    output = recipe.output_dir
    if (
        output.is_dir()
        and any(output.iterdir())
        and not recipe.training.get("resume_from_checkpoint")
    ):
        out.append(
            f"the output folder {output} is not empty: train will refuse it; pass --overwrite, "
            "choose another training.output_dir or resume with "
            "training.resume_from_checkpoint=auto"
        )
    if data:
        if data["validation"]["tokens"] > data["train"]["tokens"]:
            out.append(
                "the validation set is larger than the training set: are data.train and "
                "data.validation the right way round?"
            )
        if data["train"]["blocks"] < 8:
            out.append(
                f"the training set is only {data['train']['blocks']} blocks: expect "
                "overfitting; add text or lower data.block_size"
            )
        if data["validation"]["blocks"] < 2:
            out.append("the validation set is a single block: perplexity will be noisy")
    if recipe.model.trust_remote_code:
        out.append("model.trust_remote_code is on: code from the model repo will run")
    return out


def _machine_warnings(recipe: Recipe, args) -> list[str]:
    """Settings this machine cannot honour (a GPU-only option on a laptop, no hub token): the
    recipe may be meant for another machine, so these warn here and stop `train` there."""
    from finetune import fast, hub
    from finetune.train import check_reporting

    out = []
    for guard in (fast.check, hub.preflight, lambda r: check_reporting(args)):
        try:
            guard(recipe)
        except FinetuneError as exc:
            out.append(f"on this machine, training would stop: {exc}")
    return out


def _table(report: dict) -> str:
    lines = [f"recipe       {report['recipe']}", f"output       {report['output_dir']}"]
    model = report.get("model")
    if model:
        lines.append(
            f"model        {model['family']}, {model['parameters']:,} parameters, "
            f"{model['layers']} layers x {model['width']}, context {model['context']}"
        )
        if "lora_modules" in model:
            lines.append(
                f"lora         {len(model['lora_modules'])} modules, "
                f"{model['trainable']:,} trainable parameters"
            )
    data = report.get("data")
    if data:
        for name in ("train", "validation"):
            s = data[name]
            lines.append(
                f"{name:<12} {s['documents']} documents, {s['characters']:,} characters, "
                f"{s['tokens']:,} tokens, {s['blocks']} blocks"
            )
        lines.append(
            f"steps        {data['steps_per_epoch']} per epoch, {data['total_steps']} "
            f"in all ({data['processes']} process(es))"
        )
    speed = report.get("speed")
    if speed:
        lines.append(f"speed        {_speed_line(speed['here'])}")
        if "cuda" in speed:
            lines.append(f"on a GPU     {_speed_line(speed['cuda'])}")
    memory = report.get("memory_gib")
    if memory:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "total")
        lines.append(f"memory       ~{memory['total']:.2f} GiB per device ({parts})")
    for what in report["needs_hub"]:
        lines.append(f"needs hub    {what}: not available offline, downloaded when training")
    for warning in report["warnings"]:
        lines.append(f"warning      {warning}")
    lines.append("recipe is valid")
    return "\n".join(lines)


def _speed_line(speed: dict) -> str:
    parts = [speed["precision"] + (" + tf32" if speed["tf32"] else ""), speed["attention"]]
    parts += [f"{speed['loss']} loss", speed["optimizer"]]
    parts += ["torch.compile"] if speed["compile"] else []
    return ", ".join(parts) + f", vocabulary {speed['vocab_rows']:,} rows"
