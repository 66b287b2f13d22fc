"""Recipes: one YAML file per experiment, with `key.path=value` overrides, validated strictly.

The blocks we own (model, tokenizer, data, lora, eval, hub) are small dataclasses; each field is
documented once, where it is declared, and the README's recipe reference is generated from here.
The `training:` block belongs to `transformers.TrainingArguments` and is validated by building it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import FinetuneError

FAMILIES = ("gpt2", "gpt_neo", "gptj")


def _field(default: Any, doc: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kwargs
        )
    return field(default=default, metadata={"doc": doc}, **kwargs)


@dataclass
class ModelSpec:
    name: str | None = _field(
        None, "Hub id or local folder with pretrained weights (an earlier run's folder works too)."
    )
    architecture: Literal["gpt2", "gpt_neo", "gptj"] | None = _field(
        None, "Instead of `name`: randomly initialise this family (gpt2, gpt_neo, gptj)."
    )
    config: dict = _field(
        {}, "Config fields for `architecture`, or overrides on top of `name`'s config."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto",
        "Weights' dtype. auto: full fine-tunes keep fp32 weights and train in bf16 mixed precision "
        "where the GPU supports it; LoRA loads the frozen base in bf16 there. fp32 on CPU. "
        "bfloat16 also turns on bf16 mixed precision unless training.bf16/fp16 is set.",
    )
    revision: str | None = _field(None, "Hub revision (branch, tag or commit) of `name`.")
    trust_remote_code: bool = _field(
        False, "Run code shipped with a hub model. Off unless you trust its author."
    )
    quantization: Literal["4bit", "8bit"] | None = _field(
        None,
        "Load the frozen base in 4-bit (NF4, double quantization) or 8-bit with bitsandbytes, for "
        "LoRA on pretrained weights; CUDA only (install the `gpu` extra).",
    )


@dataclass
class TokenizerSpec:
    name: str | None = _field(None, "Hub id or local folder. Default: the model's own tokenizer.")
    train_vocab_size: int | None = _field(
        None,
        "Train a byte-level BPE of this size on the training corpus (offline or from scratch) "
        "instead of loading one.",
    )


@dataclass
class DataSpec:
    train: str | None = _field(
        None,
        "Training corpus: a .txt file | a folder or glob of .txt/.md | .jsonl/.json/.csv/.parquet "
        "| hf:NAME[:CONFIG].",
    )
    validation: str | None = _field(None, "Validation corpus, same forms. Overrides the split.")
    validation_split: float = _field(
        0.1,
        "Fraction of documents held out for validation, chosen by `training.seed`. A corpus of "
        "one document holds out its last tokens instead.",
    )
    text_column: str = _field("text", "Column holding the text in JSONL/CSV/Parquet/hub data.")
    block_size: int = _field(512, "Tokens per training example; at most the model's context.")
    encoding: str = _field("utf-8", "Text encoding of the corpus files.")
    cache_dir: str | None = _field(
        None, "Tokenized-data cache. Default: $FINETUNE_CACHE or ~/.cache/finetune."
    )
    packing: Literal["concat", "documents"] = _field(
        "concat",
        "concat: documents joined with end-of-text and cut into blocks; tokens attend across the "
        "joins. documents: the same blocks, but position ids restart at each document and no "
        "token attends to another document (the first token of each joined document is not "
        "predicted).",
    )


@dataclass
class SpeedSpec:
    attention: Literal["sdpa", "eager"] = _field(
        "sdpa",
        "sdpa: PyTorch's scaled-dot-product attention for every family (GPT-Neo through "
        "finetune's exact patch: unscaled scores, local window). eager: transformers' eager "
        "attention (the reference; GPT-Neo then materialises every T x T score).",
    )
    loss: Literal["auto", "standard", "chunked", "fused"] = _field(
        "auto",
        "standard: transformers' loss (full fp32 logits). chunked: head and loss a chunk of "
        "tokens at a time, never holding all logits (pure torch, any device). fused: Liger's "
        "fused linear cross-entropy (CUDA, `gpu` extra). auto: standard, except LoRA on a GPU "
        "(large frozen models, where memory is the limit): fused if installed, else chunked.",
    )
    pad_vocab: int | Literal["auto"] = _field(
        "auto",
        "Pad the embedding and LM head to a multiple of this many rows; their logits are masked "
        "to -inf, so the loss and samples do not change, and the saved model has the real "
        "vocabulary again (checkpoints keep the padding, for resuming). 1: off. auto: 64 for "
        "full fine-tunes of GPT-2 and GPT-Neo (50257 rows) on a CUDA GPU without FSDP or "
        "DeepSpeed (+5% measured in a hand-written loop on an H200, not yet through finetune), "
        "off otherwise. Not with LoRA.",
    )
    gpu_defaults: bool = _field(
        True,
        "On a CUDA GPU fill what `training:` leaves unset with fast settings: tf32 (Ampere or "
        "newer), fused AdamW, 4 dataloader workers (persistent) with pinned memory, and "
        "torch_compile for full GPT-2 fine-tunes with concat packing (measured to pay there; "
        "other cases are not measured yet). Ignored on CPU.",
    )


@dataclass
class LoraSpec:
    enabled: bool = _field(False, "Train LoRA adapters (PEFT) instead of all weights.")
    r: int = _field(8, "Adapter rank.")
    alpha: int = _field(16, "Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = _field(0.05, "Dropout on the adapter input.")
    target_modules: str | list[str] = _field(
        "auto",
        "auto (query and value projections of the family) | all (every attention and MLP "
        "projection) | a list of module names.",
    )


@dataclass
class EvalSpec:
    prompts: list[str] = _field([], "Prompts sampled at every evaluation into samples.jsonl.")
    max_new_tokens: int = _field(64, "Tokens generated per sample.")
    temperature: float = _field(0.8, "Sampling temperature (0 = greedy).")
    top_k: int = _field(50, "Sample among the k most likely tokens (0 = off).")
    top_p: float = _field(0.95, "Nucleus sampling threshold (1.0 = off).")
    seed: int = _field(0, "Seed for the samples, so evaluations compare like with like.")


@dataclass
class HubSpec:
    repo_id: str | None = _field(None, "OWNER/NAME of the model repo to push to.")
    private: bool = _field(False, "Create the repo private.")
    push: Literal["end", "never"] = _field("never", "end: push when training finishes.")
    license: str | None = _field(None, "License id written into the model card (e.g. mit).")


BLOCKS: dict[str, type] = {
    "model": ModelSpec,
    "tokenizer": TokenizerSpec,
    "data": DataSpec,
    "lora": LoraSpec,
    "eval": EvalSpec,
    "hub": HubSpec,
    "speed": SpeedSpec,
}
# Keys of `training:` whose values must never be written to disk (recipe.yaml, cards, logs).
SECRET_TRAINING_KEYS = ("hub_token",)


@dataclass
class Recipe:
    model: ModelSpec
    tokenizer: TokenizerSpec
    data: DataSpec
    lora: LoraSpec
    eval: EvalSpec
    hub: HubSpec
    speed: SpeedSpec
    training: dict
    source: str | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def to_dict(self) -> dict:
        """The resolved recipe as plain data, secrets removed: what `recipe.yaml` holds."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in BLOCKS}
        out["training"] = {k: v for k, v in self.training.items() if k not in SECRET_TRAINING_KEYS}
        return out

    def to_yaml(self) -> str:
        header = f"# Resolved recipe (from {self.source}), overrides applied.\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = (), check_training: bool = True) -> Recipe:
    """Read a recipe file, apply `key.path=value` overrides and validate every block.

    `check_training=False` leaves `training:` unchecked (as written), which spares importing
    transformers: for commands that only read the data blocks (`finetune prepare`).
    """
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"recipe file not found: {path} (the shipped recipes are in recipes/)")
    raw = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FinetuneError(f"{path}: a recipe must be a mapping of blocks (model:, data:, ...)")
    for override in overrides:
        apply_override(raw, override)
    return build_recipe(raw, source=str(path), check_training=check_training)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise FinetuneError(f"{where}: YAML syntax error at {at}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise FinetuneError(f"{where}: YAML syntax error: {exc}") from None


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in the nested dict, the value parsed as YAML (`x=null` sets null)."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise FinetuneError(
            f"override {override!r} is not KEY.PATH=VALUE (for example training.max_steps=50)"
        )
    value = _parse_yaml(text, f"override {key}") if text.strip() else ""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise FinetuneError(f"override {key}: {where} is not a block but {child!r}")
        node = child
    node[parts[-1]] = value


def build_recipe(raw: dict, source: str | None = None, check_training: bool = True) -> Recipe:
    """Validate plain recipe data into a Recipe; an unknown key or wrong type is a FinetuneError."""
    valid_top = [*BLOCKS, "training"]
    for key in raw:
        if key not in valid_top:
            raise FinetuneError(_unknown(str(key), valid_top))
    blocks = {}
    for name, cls in BLOCKS.items():
        value = raw.get(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise FinetuneError(f"{name}: expected a block of keys, got {value!r}")
        blocks[name] = _build_block(cls, value, name)
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise FinetuneError(f"training: expected a block of TrainingArguments, got {training!r}")
    if check_training:
        training = _check_training(training, source)
    recipe = Recipe(**blocks, training=training, source=source)
    _check_cross_fields(recipe)
    return recipe


# Names people bring from other tools (PEFT, axolotl) -> our key, for "did you mean".
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "modules": "target_modules",
    "seq_len": "block_size",
    "max_seq_length": "block_size",
    "context_length": "block_size",
    "path": "train",
    "dataset": "train",
    "eval": "validation",
    "model_name": "name",
    "model_type": "architecture",
    "torch_dtype": "dtype",
}


def _unknown(path: str, valid: list[str]) -> str:
    parent, _, key = path.rpartition(".")
    aliases = [a for a, target in ALIASES.items() if target in valid]
    close = difflib.get_close_matches(key, valid + aliases, n=1, cutoff=0.5)
    close = [ALIASES.get(c, c) if c not in valid else c for c in close]
    hint = (
        f"did you mean {parent + '.' if parent else ''}{close[0]}?"
        if close
        else (f"valid keys{' in ' + parent if parent else ''}: {', '.join(valid)}")
    )
    return f"unknown key {path}: {hint}"


def _build_block(cls: type, data: dict, block: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise FinetuneError(_unknown(f"{block}.{key}", names))
        values[key] = _check_type(value, hints[key], f"{block}.{key}")
    return cls(**values)


def _check_type(value: Any, hint: Any, path: str) -> Any:
    """Return `value` if it fits `hint` (ints accepted as floats), else raise naming the path."""
    if _fits(value, hint):
        return float(value) if hint is float and isinstance(value, int) else value
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
        try:
            return float(value)
        except ValueError:
            pass
    close = difflib.get_close_matches(str(value), _choices(hint), n=1) if value is not None else []
    hint_text = f"; did you mean {close[0]}?" if close else ""
    raise FinetuneError(f"{path}: expected {_describe(hint)}, got {value!r}{hint_text}")


def _choices(hint: Any) -> list[str]:
    """The string values a Literal (possibly inside a union) allows."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(hint) for c in _choices(arg)]
    if origin is Literal:
        return [a for a in typing.get_args(hint) if isinstance(a, str)]
    return []


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
    }.get(hint, str(hint))


def _check_training(training: dict, source: str | None) -> dict:
    """Check `training:` against TrainingArguments' own fields and build it once to validate."""
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    out = {}
    for key, value in training.items():
        if key in SECRET_TRAINING_KEYS and value:
            raise FinetuneError(
                f"training.{key}: do not put tokens in a recipe (it is saved with the run); "
                "set HF_TOKEN or run `hf auth login` instead"
            )
        if key not in fields:
            raise FinetuneError(_unknown(f"training.{key}", sorted(fields)))
        hint = fields[key].type
        if hint in ("float", float) and value is not None:
            value = _check_type(value, float, f"training.{key}")
        elif hint in ("int", int) and value is not None:
            value = _check_type(value, int, f"training.{key}")
        elif hint in ("bool", bool) and value is not None:
            value = _check_type(value, bool, f"training.{key}")
        elif value is False and "bool" not in str(hint):
            value = "no"  # YAML 1.1 reads `eval_strategy: no` as false
        out[key] = value
    if not out.get("output_dir"):
        stem = Path(source).stem if source else "run"
        out["output_dir"] = f"runs/{stem}"
    out.setdefault("report_to", "none")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda_available():
        out.setdefault("use_cpu", True)  # else Accelerate sees no distributed CPU run (gloo)
    if out.get("learning_rate") is not None and out["learning_rate"] < 0:
        raise FinetuneError(
            f"training.learning_rate must be positive, got {out['learning_rate']} (try 5e-4)"
        )
    try:
        TrainingArguments(**out)
    except (TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(f"training: {first}") from None
    return out


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_cross_fields(recipe: Recipe) -> None:
    m, d = recipe.model, recipe.data
    if (m.name is None) == (m.architecture is None):
        raise FinetuneError(
            "model: set exactly one of model.name (pretrained weights) or model.architecture "
            f"(random init of {' | '.join(FAMILIES)})"
        )
    if d.train is None:
        raise FinetuneError("data.train is not set: name a corpus file, folder or hf:NAME")
    if not 0 < d.validation_split < 1 and d.validation is None:
        raise FinetuneError(
            f"data.validation_split must be between 0 and 1 (exclusive), got {d.validation_split}"
        )
    if d.block_size <= 0:
        raise FinetuneError(f"data.block_size must be positive, got {d.block_size} (try 512)")
    if recipe.tokenizer.train_vocab_size is not None and recipe.tokenizer.train_vocab_size < 260:
        raise FinetuneError(
            "tokenizer.train_vocab_size must be at least 260 (256 bytes plus special tokens)"
        )
    if recipe.lora.r <= 0:
        raise FinetuneError(f"lora.r must be a positive integer, got {recipe.lora.r}")
    if m.quantization and not recipe.lora.enabled:
        raise FinetuneError(
            f"model.quantization={m.quantization} needs lora.enabled=true: quantized weights stay "
            "frozen, only LoRA adapters train"
        )
    if m.quantization and m.architecture:
        raise FinetuneError(
            "model.quantization needs pretrained weights (model.name), not model.architecture"
        )
    if recipe.hub.push == "end" and not recipe.hub.repo_id:
        raise FinetuneError("hub.push is 'end' but hub.repo_id is not set (OWNER/NAME)")


# --------------------------------------------------------------------------- documentation


def reference_markdown() -> str:
    """The README's recipe reference, generated from the declarations above."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for name, cls in BLOCKS.items():
        for f in dataclasses.fields(cls):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else (f.default)
            )
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...")
            doc = f.metadata["doc"].replace("|", "\\|")  # a bare | would end the table cell
            lines.append(f"| `{name}.{f.name}` | `{shown.strip()}` | {doc} |")
    lines.append(
        "| `training.*` | see below | Any `transformers.TrainingArguments` field, passed as is. |"
    )
    return "\n".join(lines)
