"""The model card: README.md with hub metadata, and a body that says how the model was made.

Everything comes from the run folder (recipe.yaml, metrics.json, samples.jsonl) and the data files
the recipe names; nothing is fetched. The card never holds a token: it is built from recipe.yaml,
which has none (see Recipe.to_dict).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from finetune import corpus

if TYPE_CHECKING:
    from finetune.upload import Base, Run

MAX_SAMPLES = 3  # prompts shown from the last evaluation
MAX_FILES = 20  # files listed per split in the data fingerprint
KIND_TEXT = {
    "full": "a full fine-tune",
    "adapter": "a LoRA adapter",
    "merged": "a LoRA fine-tune merged into full weights",
}


def model_card(
    run: Run,
    kind: str,
    repo_id: str,
    base: Base,
    base_included: bool,
    parameters: int | None = None,
) -> str:
    """README.md for the upload of `run` as `kind` (full, adapter or merged) to `repo_id`."""
    from huggingface_hub import ModelCard, ModelCardData

    recipe, metrics = run.recipe, run.metrics
    tags = ["finetune", *([base.family] if base.family else []), "text-generation"]
    if run.lora:
        tags.append("lora")
    if base.kind == "random":
        tags.append("trained-from-scratch")
    data = ModelCardData(
        base_model=base_model_value(base),
        library_name="peft" if kind == "adapter" else "transformers",
        license=(recipe.get("hub") or {}).get("license"),
        datasets=hub_datasets(recipe) or None,
        pipeline_tag="text-generation",
        tags=tags,
    )
    sections = [
        _title(repo_id, run, kind, base, base_included, parameters),
        _usage(repo_id, kind, base, base_included),
        _evaluation(metrics, recipe),
        _samples(run.path / "samples.jsonl", recipe),
        _plots(run),
        _data_fingerprint(run.path, recipe, metrics),
        _training(run, metrics),
        _recipe(run.recipe_text),
    ]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"
    ModelCard(text)  # parses the metadata back, as the hub will; raises if it does not
    return text


def base_model_value(base: Base) -> str | None:
    """The card's `base_model`: the hub id the run descends from, or None (the field is left out).

    The hub refuses a card whose `base_model` is not a model id on the hub ("Use a model id from
    https://hf.co/models"), so a run trained from scratch or from an untraceable local folder
    says where it came from in the card's text (and the `trained-from-scratch` tag) instead.
    """
    return base.hub_id or None


def hub_datasets(recipe: dict) -> list[str]:
    found = []
    for key in ("train", "validation"):
        spec = (recipe.get("data") or {}).get(key)
        if isinstance(spec, str) and spec.startswith(corpus.HUB_PREFIX):
            name = spec[len(corpus.HUB_PREFIX) :].partition(":")[0]
            if name not in found:
                found.append(name)
    return found


# --------------------------------------------------------------------------- sections


def _title(repo_id, run, kind, base, base_included, parameters) -> str:
    if base.kind == "random":
        origin = (
            f"a randomly initialised {base.family or 'model'} (no pretrained weights: all it "
            "knows comes from the data below)"
        )
    elif base.kind == "hub":
        revision = f" (revision `{base.revision}`)" if base.revision else ""
        origin = f"[{base.name}](https://huggingface.co/{base.name}){revision}"
    else:
        origin = f"the local model `{Path(base.name).name}`"
        if base.hub_id:
            origin += (
                f", itself descended from [{base.hub_id}](https://huggingface.co/{base.hub_id})"
            )
    subject = {
        "full": f"A full fine-tune of {origin}",
        "adapter": f"A LoRA adapter for {origin}",
        "merged": f"A LoRA fine-tune of {origin}, merged into full weights",
    }[kind]
    data = _data_phrase(run.recipe)
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{subject}, trained with finetune from one recipe (below) on {data}.",
    ]
    if run.lora:
        lora = run.recipe.get("lora") or {}
        lines.append(
            f"\nLoRA: rank {lora.get('r')}, alpha {lora.get('alpha')}, dropout "
            f"{lora.get('dropout')}, on {', '.join(_lora_targets(run))}."
        )
    if kind == "adapter" and base_included:
        lines.append(
            "\nThe base model is not on the hub, so this repository carries it in `base/`: load "
            "the base from that folder, then the adapter from the repository root (see below)."
        )
    if kind == "merged":
        lines.append(
            "\nThe adapter is merged into the base weights: this is a plain transformers "
            "model; PEFT is not needed to use it."
        )
    if parameters:
        what = "adapter parameters" if kind == "adapter" else "parameters"
        lines.append(f"\n{parameters:,} {what}, in safetensors.")
    m = run.metrics
    if "perplexity" in m:
        lines.append(
            f"\nValidation perplexity: {_num(m.get('perplexity_before'))} before "
            f"training, {_num(m['perplexity'])} after."
        )
    return "\n".join(lines)


def _lora_targets(run: Run) -> list[str]:
    """The modules the adapter wraps, as PEFT recorded them (the recipe may just say auto)."""
    try:
        targets = json.loads((run.path / "adapter_config.json").read_text())["target_modules"]
    except (OSError, KeyError, json.JSONDecodeError):
        targets = (run.recipe.get("lora") or {}).get("target_modules")
    return sorted(targets) if isinstance(targets, list) else [str(targets)]


def _data_phrase(recipe: dict) -> str:
    data = recipe.get("data") or {}
    train = data.get("train")
    if isinstance(train, str) and train.startswith(corpus.HUB_PREFIX):
        name = train[len(corpus.HUB_PREFIX) :]
        return f"the hub dataset [{name}](https://huggingface.co/datasets/{name.split(':')[0]})"
    return f"`{Path(str(train)).name}`"


def _usage(repo_id: str, kind: str, base: Base, base_included: bool) -> str:
    intro = (
        "## How to use\n\n`generation_config.json` holds the sampling settings the run used, "
        "so `generate` and the pipeline sample the same way by default.\n"
    )
    if kind != "adapter":
        code = f"""from transformers import pipeline

generator = pipeline("text-generation", model="{repo_id}")
print(generator("Hello,", max_new_tokens=50)[0]["generated_text"])"""
        return f"{intro}\n```python\n{code}\n```"
    if base_included:  # from_pretrained(repo, subfolder=...) would follow adapter_config.json
        head = "from huggingface_hub import snapshot_download\n"
        load = (
            f'path = snapshot_download("{repo_id}")  # the adapter, and its base in base/\n'
            'base = AutoModelForCausalLM.from_pretrained(f"{path}/base")'
        )
        adapter = "path"
    else:
        head, adapter = "", f'"{repo_id}"'
        revision = f', revision="{base.revision}"' if base.revision else ""
        load = f'base = AutoModelForCausalLM.from_pretrained("{base.name}"{revision})'
    code = f"""{head}from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

{load}
model = PeftModel.from_pretrained(base, {adapter})
tokenizer = AutoTokenizer.from_pretrained({adapter})
inputs = tokenizer("Hello,", return_tensors="pt")
settings = GenerationConfig.from_pretrained({adapter})  # the run's sampling settings
output = model.generate(**inputs, generation_config=settings)
print(tokenizer.decode(output[0], skip_special_tokens=True))"""
    tip = (
        "\n\nFor a plain transformers model, merge once with "
        "`model = model.merge_and_unload()`, or push the run with `finetune push RUN --merged`."
    )
    return f"{intro}\n```python\n{code}\n```{tip}"


def _evaluation(metrics: dict, recipe: dict) -> str:
    if "perplexity" not in metrics:
        return "## Evaluation\n\nmetrics.json holds no evaluation."
    val = (metrics.get("data") or {}).get("validation") or {}
    where = f" ({val['tokens']:,} tokens)" if "tokens" in val else ""
    block = (recipe.get("data") or {}).get("block_size")
    rows = [
        "## Evaluation",
        "",
        f"On the validation set{where}, in blocks of {block} tokens (from `metrics.json`):",
        "",
        "| | before training | after training |",
        "| --- | ---: | ---: |",
        f"| perplexity | {_num(metrics.get('perplexity_before'))} | "
        f"{_num(metrics['perplexity'])} |",
        f"| eval loss | {_num(metrics.get('eval_loss_before'), 4)} | "
        f"{_num(metrics.get('eval_loss'), 4)} |",
    ]
    if metrics.get("train_loss") is not None:
        rows.append(f"\nFinal training loss: {_num(metrics['train_loss'], 4)}.")
    return "\n".join(rows)


def read_samples(path: Path) -> list[tuple[dict | None, dict]]:
    """(first, last) samples per prompt from samples.jsonl (step, prompt, text), for the prompts
    of the last evaluation; `first` is None when the prompt was sampled only once."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("text"), str):
            entries.append(entry)
    if not entries:
        return []
    last = max(_step(e) for e in entries)
    pairs = []
    for latest in [e for e in entries if _step(e) == last][:MAX_SAMPLES]:
        same = [e for e in entries if e.get("prompt") == latest.get("prompt")]
        first = min(same, key=_step)
        pairs.append((first if _step(first) < last else None, latest))
    return pairs


def _step(entry: dict) -> int:
    return entry.get("step") or 0


def _samples(path: Path, recipe: dict) -> str:
    pairs = read_samples(path)
    if not pairs:
        return ""
    ev = recipe.get("eval") or {}
    lines = [
        "## Samples",
        "",
        f"Continuations sampled with temperature {ev.get('temperature')}, top-k "
        f"{ev.get('top_k')}, top-p {ev.get('top_p')} and seed {ev.get('seed')}, at the first "
        "and the last evaluation; every sample is in `samples.jsonl`.",
    ]
    for first, last in pairs:
        lines += ["", f"**Prompt:** {json.dumps(last.get('prompt', ''), ensure_ascii=False)}"]
        for sample in (first, last):
            if sample is not None:
                fence = _fence(sample["text"])
                lines += [
                    "",
                    f"Step {_step(sample)}{' (before training)' if _step(sample) == 0 else ''}:",
                    "",
                    f"{fence}text\n{sample['text']}\n{fence}",
                ]
    return "\n".join(lines)


def _plots(run: Run) -> str:
    plots = sorted((run.path / "plots").glob("*.png")) if (run.path / "plots").is_dir() else []
    if not plots:
        return ""
    return "## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots)


def _data_fingerprint(run_path: Path, recipe: dict, metrics: dict) -> str:
    data = recipe.get("data") or {}
    stats = metrics.get("data") or {}
    lines = [
        "## Training data",
        "",
        "| split | source | documents | characters | tokens | blocks |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for split in ("train", "validation"):
        s = stats.get(split) or {}
        source = (
            f"`{data[split]}`"
            if data.get(split)
            else (
                f"{data.get('validation_split')} of train, held out"
                if split == "validation"
                else "?"
            )
        )
        lines.append(
            f"| {split} | {source} | {_int(s.get('documents'))} | "
            f"{_int(s.get('characters'))} | {_int(s.get('tokens'))} | "
            f"{_int(s.get('blocks'))} |"
        )
    files = []
    for split in ("train", "validation"):
        spec = data.get(split)
        if isinstance(spec, str):
            files.append(_split_files(split, spec, run_path))
    return "\n".join(lines) + ("\n\n" + "\n\n".join(files) if files else "")


def _split_files(split: str, spec: str, run_path: Path) -> str:
    if spec.startswith(corpus.HUB_PREFIX):
        return f"`{split}` is the hub dataset `{spec[len(corpus.HUB_PREFIX) :]}` (split `train`)."
    source = _resolve_quietly(spec, run_path)
    if source is None:
        return (
            f"`{split}`: `{spec}` was not found when this card was built, so its files are "
            "not fingerprinted here."
        )
    rows = [
        f"`{split}` files (sha256 of each file's bytes; corpus fingerprint "
        f"`{source.fingerprint()[:16]}`):",
        "",
        "| file | bytes | sha256 |",
        "| --- | ---: | --- |",
    ]
    for path in source.files[:MAX_FILES]:
        rows.append(f"| `{path.name}` | {path.stat().st_size:,} | `{sha256_file(path)}` |")
    if len(source.files) > MAX_FILES:
        rows.append(f"| … and {len(source.files) - MAX_FILES} more files | | |")
    return "\n".join(rows)


def _resolve_quietly(spec: str, run_path: Path):
    """The corpus files as at training time: relative paths are tried from here, then the run."""
    from finetune.errors import FinetuneError

    for candidate in (spec, str(run_path.parent / spec)):
        try:
            return corpus.resolve(candidate, "data")
        except FinetuneError:
            continue
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _training(run: Run, metrics: dict) -> str:
    env = metrics.get("environment")
    note = ""
    if not isinstance(env, dict):
        env = environment()
        note = (
            " (of the machine that built this card: the run's metrics.json does not record "
            "the training machine)"
        )
    lines = ["## Training", ""]
    seconds = metrics.get("train_seconds")
    if seconds is not None:
        lines.append(
            f"- time: {_duration(seconds)} for {_int(metrics.get('global_step'))} steps, "
            f"{_int(metrics.get('train_tokens'))} tokens "
            f"({_int(metrics.get('train_tokens_per_second'))} tokens/s)"
        )
    if metrics.get("world_size"):
        lines.append(f"- processes: {metrics['world_size']}")
    lines.append(f"- hardware{note}: {env.get('hardware', 'unknown')}")
    versions = env.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def _recipe(recipe_text: str) -> str:
    fence = _fence(recipe_text)
    return (
        "## Recipe\n\nThe resolved recipe (`recipe.yaml` in this repository); "
        "`finetune train recipe.yaml` reproduces the run given the same data.\n\n"
        f"{fence}yaml\n{recipe_text.rstrip()}\n{fence}"
    )


# --------------------------------------------------------------------------- helpers


def environment() -> dict:
    """Hardware and library versions of this machine, as the card reports them."""
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        hardware = f"{n} x {torch.cuda.get_device_name(0)}"
    else:
        hardware = f"CPU: {_cpu_name()}, {os.cpu_count()} cores"
    versions = {"python": platform.python_version()}
    for package in ("finetune", "torch", "transformers", "peft", "tokenizers", "huggingface_hub"):
        try:
            versions[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            continue
    return {"hardware": hardware, "versions": versions}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or sys.platform


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _int(value) -> str:
    return "n/a" if value is None else f"{int(value):,}"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"
