"""LoRA through PEFT: choosing target modules by what a family's layers are, wrapping, merging."""

from __future__ import annotations

from finetune.config import LoraSpec
from finetune.errors import FinetuneError

# Query and value projections, the LoRA paper's choice. GPT-2 fuses q, k and v into one Conv1D.
AUTO_TARGETS = {"gpt2": ["c_attn"], "gpt_neo": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"]}


def projection_modules(model) -> dict[str, str]:
    """Every attention and MLP projection inside the transformer blocks: full name -> layer type.

    Found by type (nn.Linear or transformers' Conv1D, as GPT-2 uses), not by name; the embeddings
    and the output head are left out.
    """
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and ".h." in f".{name}":
            found[name] = type(module).__name__
    return found


def target_modules(model, spec: LoraSpec) -> list[str]:
    """Module names (last path component) that LoRA wraps, checked against what the model has."""
    projections = projection_modules(model)
    available = sorted({name.rsplit(".", 1)[-1] for name in projections})
    if spec.target_modules == "auto":
        wanted = AUTO_TARGETS[model.config.model_type]
    elif spec.target_modules == "all":
        wanted = available
    elif isinstance(spec.target_modules, str):
        raise FinetuneError(
            f"lora.target_modules: {spec.target_modules!r} is not auto, all or a list of names "
            f"(available: {', '.join(available)})"
        )
    else:
        wanted = list(spec.target_modules)
    missing = [w for w in wanted if w not in available]
    if missing:
        raise FinetuneError(
            f"lora.target_modules: {', '.join(missing)} matches no module of this "
            f"{model.config.model_type} model; available: {', '.join(available)}"
        )
    return wanted


def apply_lora(model, spec: LoraSpec, log=print):
    """Wrap the model with fresh LoRA adapters; print what was matched and what trains."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules(model, spec)
    matched = [n for n in projection_modules(model) if n.rsplit(".", 1)[-1] in targets]
    conv1d = any(projection_modules(model)[n] == "Conv1D" for n in matched)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,  # Conv1D stores its weight transposed
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA: {len(matched)} modules matched ({', '.join(targets)}), e.g. {matched[0]}")
    log(f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def merge_run(run: str) -> str:
    """Merge a LoRA run's adapter into its base; save the full model to RUN/merged/ atomically."""
    import os
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from finetune.model import load_run_model

    path = Path(run)
    if not path.is_dir():
        raise FinetuneError(f"run folder not found: {run} (give a LoRA run folder)")
    if not (path / "adapter_config.json").is_file():
        raise FinetuneError(f"{run} is not a LoRA run folder (no adapter_config.json)")
    model = load_run_model(path, merge=True)
    staging = path / ".merged-staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(str(path)).save_pretrained(staging)
    target = path / "merged"
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return str(target)
