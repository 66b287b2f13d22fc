"""Loading GPT-2, GPT-Neo and GPT-J: pretrained (hub, local folder, an earlier run) or random init.

A family is recognised by its config's `model_type`, never by the model's name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from finetune import vocab
from finetune.config import FAMILIES, ModelSpec, Recipe, TokenizerSpec
from finetune.errors import FinetuneError
from finetune.net import require_hub

BASE_SUBDIR = "base"  # where a LoRA run keeps a randomly initialised base model


# --------------------------------------------------------------------------- configs


def check_family(config, where: str) -> None:
    if config.model_type not in FAMILIES:
        raise FinetuneError(
            f"{where}: model type {config.model_type!r} is not supported; finetune supports "
            f"{', '.join(FAMILIES)} (GPT-2, GPT-Neo, GPT-J)"
        )


def resolve_config(spec: ModelSpec):
    """The model config with `model.config` applied, read without downloading weights."""
    from transformers import AutoConfig

    overrides = dict(spec.config)
    if spec.architecture:
        overrides = _family_defaults(spec.architecture, overrides)
        try:
            config = AutoConfig.for_model(spec.architecture, **overrides)
        except (TypeError, ValueError) as exc:
            raise FinetuneError(f"model.config: {exc}") from None
    else:
        source = pretrained_source(spec.name)
        try:
            config = AutoConfig.from_pretrained(source, **_hub_kwargs(spec, source))
        except (OSError, ValueError) as exc:
            raise FinetuneError(
                f"model.name: cannot read the config of {spec.name!r}: {str(exc).splitlines()[0]}"
            ) from None
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise FinetuneError(
                    f"model.config.{key}: {config.model_type} configs have no such field"
                )
            setattr(config, key, value)
    check_family(config, "model.name" if spec.name else "model.architecture")
    return config


def _family_defaults(family: str, overrides: dict) -> dict:
    """Fill config fields that must agree with others, so a tiny config needs only its sizes."""
    out = dict(overrides)
    if family == "gpt_neo" and "num_layers" in out and "attention_types" not in out:
        # GPT-Neo alternates global and local layers; the pattern must cover every layer.
        n = out["num_layers"]
        out["attention_types"] = [[["global", "local"], n // 2]] + (
            [[["global"], 1]] if n % 2 else []
        )
    if family == "gptj":
        embd, heads = out.get("n_embd", 4096), out.get("n_head", 16)
        head_dim = embd // heads if heads else embd
        if out.get("rotary_dim", 64) > head_dim:
            out["rotary_dim"] = head_dim  # rotary dims cannot exceed the head size
    return out


def context_length(config) -> int:
    return int(config.max_position_embeddings)


# --------------------------------------------------------------------------- sources


def pretrained_source(name: str) -> str:
    """A local folder as is (a LoRA run's merged model if it has one), else a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
            if (path / "merged" / "config.json").is_file():
                return str(path / "merged")
            raise FinetuneError(
                f"model.name: {name} is a LoRA run; run `finetune merge {name}` first and "
                f"use {path / 'merged'}"
            )
        if not (path / "config.json").is_file():
            raise FinetuneError(f"model.name: {name} is a folder without config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FinetuneError(f"model.name: folder not found: {name}")
    return name


def _hub_kwargs(spec: ModelSpec, source: str) -> dict:
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if Path(source).is_dir():
        return kwargs
    if spec.revision:
        kwargs["revision"] = spec.revision
    if _in_hub_cache(source, spec.revision):
        kwargs["local_files_only"] = True
    else:
        require_hub(f"the model {source!r}", "model.name")
    return kwargs


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid repo id is simply "not cached"
        return False
    return isinstance(found, str)


# --------------------------------------------------------------------------- models


def load_model(recipe: Recipe, config, tokenizer):
    """The model to train: pretrained or a random init, its embeddings fitting the tokenizer."""
    from transformers import AutoModelForCausalLM

    spec = recipe.model
    dtype = weights_dtype(spec.dtype, lora=recipe.lora.enabled)
    if spec.trust_remote_code:
        print("warning: model.trust_remote_code is on: code from the model's repo will run")
    vocab_size = len(tokenizer)
    if spec.architecture:
        config.vocab_size = vocab_size
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        from finetune.quantize import load_kwargs

        source = pretrained_source(spec.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                dtype=dtype,
                **_hub_kwargs(spec, source),
                **load_kwargs(spec.quantization),
            )
        except OSError as exc:
            raise FinetuneError(
                f"model.name: cannot load weights of {spec.name!r}: {str(exc).splitlines()[0]}"
            ) from None
        if vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)
    # GPT-2's config names no loss type; without one the Trainer counts every block's first
    # token as predicted and reports eval_loss too low by a factor (block - 1) / block.
    model.loss_type = model.loss_type or "ForCausalLM"
    model.config.pad_token_id = tokenizer.pad_token_id  # end-of-text, see finish_tokenizer
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def weights_dtype(setting: str, lora: bool) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if lora and bf16_supported():
        return torch.bfloat16  # a frozen base needs no fp32 master copy
    return torch.float32


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# --------------------------------------------------------------------------- tokenizers


def load_tokenizer(spec: TokenizerSpec, model: ModelSpec):
    """The tokenizer named by the recipe, else the model's own; pad set to end-of-text."""
    from transformers import AutoTokenizer

    name = spec.name or model.name
    if name is None:
        raise FinetuneError(
            "tokenizer: a randomly initialised model needs tokenizer.name or "
            "tokenizer.train_vocab_size (for example tokenizer.train_vocab_size=2000)"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        source = (
            str(path / "merged")
            if (path / "merged" / "tokenizer_config.json").is_file()
            else (str(path))
        )
        kwargs = {}
    else:
        source = name
        kwargs = _hub_kwargs(model, name) if not spec.name else _tokenizer_hub_kwargs(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise FinetuneError(
            f"tokenizer: cannot load {name!r}: {str(exc).splitlines()[0]}"
        ) from None
    return finish_tokenizer(tokenizer)


def build_tokenizer(recipe: Recipe, log=print):
    """Load the tokenizer, or train one on the training corpus (cached by corpus and size)."""
    spec = recipe.tokenizer
    if spec.train_vocab_size is None:
        return load_tokenizer(spec, recipe.model)
    import shutil

    from transformers import AutoTokenizer

    from finetune import corpus
    from finetune.data import cache_root

    source = corpus.resolve(recipe.data.train, "data.train")
    key = f"{source.fingerprint()[:20]}-{spec.train_vocab_size}-{recipe.data.text_column}"
    path = cache_root(recipe.data) / "tokenizers" / key
    if not (path / "tokenizer.json").is_file():
        docs = corpus.read_documents(source, recipe.data.text_column, recipe.data.encoding)
        log(f"training a {spec.train_vocab_size}-token BPE tokenizer on {source.spec}")
        tokenizer = train_tokenizer(docs, spec.train_vocab_size)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return finish_tokenizer(AutoTokenizer.from_pretrained(str(path)))


def _tokenizer_hub_kwargs(name: str) -> dict:
    if _in_hub_cache(name, None):
        return {"local_files_only": True}
    require_hub(f"the tokenizer {name!r}", "tokenizer.name")
    return {}


def finish_tokenizer(tokenizer):
    # GPT-2-family tokenizers have no pad token. Padding only happens in batched generation and
    # evaluation, where the attention mask (not the token id) says what is padding, so reusing
    # end-of-text is safe and real end-of-text tokens are never masked out of the loss.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on the corpus; <|endoftext|> is its only special."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        documents, vocab_size=vocab_size, special_tokens=[eot], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token=eot,
        bos_token=eot,
        unk_token=eot,
        model_max_length=1_000_000,
    )
    return finish_tokenizer(tokenizer)


def load_run_model(path: str | Path, dtype: torch.dtype = torch.float32, merge: bool = False):
    """A model from a run folder (full or LoRA) or any local model folder, ready for inference.

    A LoRA run loads its base and the adapter unmerged, unless `merge` is set.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(lora_base_path(path), dtype=dtype)
        model = PeftModel.from_pretrained(base, str(path))
        return model.merge_and_unload() if merge else model
    if not (path / "config.json").is_file():
        raise FinetuneError(f"{path} is not a run or model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    vocab.unpad(model)  # a checkpoint of a padded run
    return model


def lora_base_path(run: Path) -> str:
    """The base model of a LoRA run: its own saved base, else what the adapter config names."""
    if (run / BASE_SUBDIR / "config.json").is_file():
        return str(run / BASE_SUBDIR)
    name = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not os.path.isdir(name):
        require_hub(f"the base model {name!r} of this LoRA run", str(run))
    return name
