"""The folder `finetune push` uploads, built in RUN/upload/: what goes up and nothing else.

Weights as safetensors only, config, tokenizer, generation_config.json with the run's sampling
settings, recipe.yaml, metrics.json, samples.jsonl, plots and README.md (the card). Files are
picked by name, so checkpoints, optimizer states and pickles (training_args.bin) never go up, and
a last scan refuses any pickle that slipped in.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune import card
from finetune.errors import FinetuneError
from finetune.model import BASE_SUBDIR

UPLOAD_SUBDIR = "upload"  # RUN/upload/ is the folder that goes up, kept for inspection
CONFIG_FILES = ("config.json",)
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
RECORD_FILES = ("recipe.yaml", "metrics.json", "samples.jsonl")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class Run:
    """A finished run folder, as the card and the upload need it."""

    path: Path
    recipe: dict
    recipe_text: str
    metrics: dict
    lora: bool


@dataclass
class Base:
    """What a run started from: a hub model, a random init of a family, or a local folder."""

    kind: str  # "hub" | "random" | "local"
    name: str  # hub id, family, or folder as the recipe names it
    family: str | None = None
    revision: str | None = None
    hub_id: str | None = None  # the hub model it descends from, if any: the card's base_model
    folder: Path | None = None  # a local folder with its weights, where there is one


def read_run(run: str | Path) -> Run:
    path = Path(run)
    if not path.is_dir():
        raise FinetuneError(f"run folder not found: {run}")
    if path.name == UPLOAD_SUBDIR and (path.parent / "recipe.yaml").is_file():
        raise FinetuneError(
            f"{run} is an upload folder built by finetune push; push its run "
            f"folder instead: {path.parent}"
        )
    has_model = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    if not has_model or not (path / "recipe.yaml").is_file():
        raise FinetuneError(
            f"{run} is not a run folder (no recipe.yaml and saved model); "
            "name the output_dir of a finished `finetune train`"
        )
    if not (path / "metrics.json").is_file():
        raise FinetuneError(
            f"{run} has no metrics.json, so its training did not finish; finish "
            "it first (training.resume_from_checkpoint=auto)"
        )
    text = (path / "recipe.yaml").read_text(encoding="utf-8")
    try:
        recipe = yaml.safe_load(text) or {}
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise FinetuneError(f"{run}: cannot read recipe.yaml or metrics.json ({exc})") from None
    lora = (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()
    return Run(path, recipe, text, metrics, lora)


# --------------------------------------------------------------------------- the upload folder


def build_upload(run: Run, repo_id: str, merged: bool = False, offline: bool = True) -> Path:
    """Write RUN/upload/ (through a staging folder, so a failure leaves no half-built folder).

    `offline`: a merged upload may load its base only from the local cache.
    """
    target = run.path / UPLOAD_SUBDIR
    staging = run.path / ".upload-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        kind = "merged" if merged else "adapter" if run.lora else "full"
        base = describe_base(run, need_weights=run.lora)
        base_included = False
        if kind == "full":
            parameters = _copy_model(run.path, staging, str(run.path))
            source = run.path
        elif kind == "merged":
            parameters = _write_merged(run, base, staging, offline)
            source = staging
        else:
            parameters = _copy_adapter(run, base, staging)
            base_included = base.kind != "hub"
            if base_included:
                _copy_model(base.folder, staging / BASE_SUBDIR, f"the base model {base.folder}")
                _copy_files(base.folder, staging / BASE_SUBDIR, TOKENIZER_FILES)
            source = base.folder
        base.family = base.family or _family(staging) or _family(source)
        _copy_files(run.path, staging, TOKENIZER_FILES + RECORD_FILES)
        _copy_plots(run.path, staging)
        destinations = [staging] + ([staging / BASE_SUBDIR] if base_included else [])
        write_generation_config(run, source, destinations)
        readme = card.model_card(run, kind, repo_id, base, base_included, parameters)
        (staging / "README.md").write_text(readme, encoding="utf-8")
        check_no_pickles(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def describe_base(run: Run, need_weights: bool) -> Base:
    """The run's starting point, from recipe.yaml; for a LoRA run, where its weights are."""
    from finetune.model import pretrained_source

    model = run.recipe.get("model") or {}
    if model.get("architecture"):
        family = model["architecture"]
        folder = run.path / BASE_SUBDIR
        if need_weights and not (folder / "config.json").is_file():
            raise FinetuneError(
                f"{run.path} is a LoRA run on a random init, but its base model "
                f"is missing from {folder}; train it again"
            )
        return Base("random", family, family=family, folder=folder)
    name = str(model.get("name"))
    if Path(name).expanduser().is_dir():
        folder = Path(pretrained_source(name))
        return Base(
            "local", name, family=_family(folder), hub_id=_trace_hub_id(folder), folder=folder
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        if need_weights:
            raise FinetuneError(
                f"the base model folder {name} of this LoRA run is gone, so its "
                "adapter cannot be published; restore the folder and push again"
            )
        return Base("local", name)
    return Base(
        "hub",
        name,
        revision=model.get("revision"),
        hub_id=name,
        # A full run's own config names the family too, where the hub's is not cached.
        family=_family_in_cache(name, model.get("revision")) or _family(run.path),
    )


def _trace_hub_id(folder: Path, depth: int = 5) -> str | None:
    """Follow earlier runs' recipe.yaml back to a hub model, if the chain leads to one."""
    for _ in range(depth):
        recipe_file = folder / "recipe.yaml"
        if not recipe_file.is_file() and folder.name == "merged":
            recipe_file = folder.parent / "recipe.yaml"
        if not recipe_file.is_file():
            return None
        name = ((yaml.safe_load(recipe_file.read_text()) or {}).get("model") or {}).get("name")
        if not name:
            return None
        if not Path(name).expanduser().is_dir():
            return None if name.startswith((".", "/", "~")) else name
        folder = Path(name).expanduser()
    return None


def _family(folder: Path | None) -> str | None:
    config = folder / "config.json" if folder else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("model_type")


def _family_in_cache(repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an odd id is simply "not cached"
        return None
    return _family(Path(found).parent) if isinstance(found, str) else None


def _copy_model(src: Path, dest: Path, what: str) -> int:
    """config.json and the safetensors weights; returns the parameter count."""
    weights = sorted(p for pattern in WEIGHT_PATTERNS for p in src.glob(pattern))
    if not any(p.suffix == ".safetensors" for p in weights):
        raise FinetuneError(
            f"{what} has no safetensors weights (model.safetensors), and only "
            "safetensors are published; save it again with safetensors"
        )
    dest.mkdir(parents=True, exist_ok=True)
    _copy_files(src, dest, CONFIG_FILES)
    for path in weights:
        _link_or_copy(path, dest / path.name)
    return _count_parameters(p for p in weights if p.suffix == ".safetensors")


def _copy_adapter(run: Run, base: Base, dest: Path) -> int:
    weights = run.path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FinetuneError(f"{run.path} has no {ADAPTER_WEIGHTS}; only safetensors are published")
    _link_or_copy(weights, dest / ADAPTER_WEIGHTS)
    config = json.loads((run.path / "adapter_config.json").read_text())
    # The run's config names the base by a path on this machine; name it as a user can reach it.
    config["base_model_name_or_path"] = base.name if base.kind == "hub" else BASE_SUBDIR
    config["revision"] = base.revision if base.kind == "hub" else None
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return _count_parameters([weights])


def _write_merged(run: Run, base: Base, dest: Path, offline: bool) -> int:
    """Merge the adapter into its base (in the weights' own dtype) and save it as safetensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base.folder is not None:
        source, kwargs = str(base.folder), {}
    else:
        from finetune.model import _in_hub_cache
        from finetune.net import require_hub

        source, kwargs = base.name, {"revision": base.revision}
        if _in_hub_cache(base.name, base.revision):
            kwargs["local_files_only"] = True
        elif offline:
            raise FinetuneError(
                f"--merged needs the base model {base.name}, which is not in the "
                "local hub cache, and --dry-run contacts nothing; run `hf download "
                f"{base.name}` first, or push without --dry-run"
            )
        else:
            require_hub(f"the base model {base.name!r}", "--merged")
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", **kwargs)
    model = PeftModel.from_pretrained(model, str(run.path)).merge_and_unload()
    model.save_pretrained(dest)  # safetensors
    (dest / "generation_config.json").unlink(missing_ok=True)  # written from the recipe below
    return sum(p.numel() for p in model.parameters())


def write_generation_config(run: Run, source: Path | None, destinations: list[Path]) -> None:
    """generation_config.json with the sampling settings the run used (recipe `eval:`)."""
    from transformers import AutoTokenizer, GenerationConfig

    if source is not None and (source / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(str(source))
    else:
        config = GenerationConfig()
    tokenizer = AutoTokenizer.from_pretrained(str(run.path))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key, None) is None:
            value = getattr(tokenizer, key, None)
            if key == "pad_token_id" and value is None:
                value = tokenizer.eos_token_id  # as finish_tokenizer does
            setattr(config, key, value)
    ev = run.recipe.get("eval") or {}
    temperature = float(ev.get("temperature", 0.8))
    sampling = temperature > 0
    config.do_sample = sampling
    config.temperature = temperature if sampling else None
    config.top_k = int(ev.get("top_k", 50)) if sampling else None
    config.top_p = float(ev.get("top_p", 1.0)) if sampling else None
    config.max_new_tokens = int(ev.get("max_new_tokens", 64))
    config._from_model_config = False  # so transformers keeps these settings
    config.validate(strict=True)
    for folder in destinations:
        config.save_pretrained(str(folder))


def _copy_files(src: Path, dest: Path, names) -> None:
    for name in names:
        if (src / name).is_file():
            _link_or_copy(src / name, dest / name)


def _copy_plots(src: Path, dest: Path) -> None:
    plots = sorted((src / "plots").glob("*.png")) if (src / "plots").is_dir() else []
    for path in plots:
        (dest / "plots").mkdir(exist_ok=True)
        _link_or_copy(path, dest / "plots" / path.name)


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link where the file system allows (no second copy of the weights), else a copy.

    Safe because nothing here writes into a linked file: changed files are written anew.
    """
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _count_parameters(files) -> int:
    from math import prod

    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += sum(prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def check_no_pickles(folder: Path) -> None:
    found = [p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if found:
        raise FinetuneError(
            f"refusing to publish pickle files ({found[0].name}); finetune "
            "publishes safetensors only"
        )


def listing(folder: Path) -> list[str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    width = max(len(str(p.relative_to(folder))) for p in files)
    return [f"{str(p.relative_to(folder)):<{width}}  {_size(p.stat().st_size)}" for p in files]


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
