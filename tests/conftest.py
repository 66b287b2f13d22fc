"""Shared fixtures: tiny models of all three families, a tiny tokenizer, small corpora, tiny runs.

No test touches the network: models are built from configs in-process, the tokenizer is trained
on the bundled sample corpus, and HF_HUB_OFFLINE is set for the whole session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "offline-demo.yaml"
SAMPLE = ROOT / "data" / "sample-podcast.txt"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tiny configs (2 layers, width 64) for each family, as `model.config` overrides.
TINY = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128},
    "gpt_neo": {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "max_position_embeddings": 128},
    "gptj": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128},
}


def tiny_config_arg(family: str) -> str:
    """`model.config={...}` in the command-line override syntax."""
    inner = ", ".join(f"{k}: {v}" for k, v in TINY[family].items())
    return f"model.config={{{inner}}}"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["FINETUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Train and validation text files cut from the bundled sample corpus."""
    folder = tmp_path_factory.mktemp("corpus")
    text = SAMPLE.read_text()
    cut = text.index("\n", int(len(text) * 0.85))
    (folder / "train.txt").write_text(text[:cut])
    (folder / "val.txt").write_text(text[cut + 1 :])
    return {"train": folder / "train.txt", "validation": folder / "val.txt"}


@pytest.fixture(scope="session")
def tokenizer():
    """A 512-token byte-level BPE trained on the sample corpus (well under a second)."""
    from finetune.model import train_tokenizer

    return train_tokenizer([SAMPLE.read_text()], 512)


def build_tiny_model(family: str, vocab_size: int = 512, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.model import _family_defaults

    config = AutoConfig.for_model(
        family, **_family_defaults(family, {**TINY[family], "vocab_size": vocab_size, **overrides})
    )
    return AutoModelForCausalLM.from_config(config)


def run_cli(*args: str) -> int:
    from finetune.cli import main

    return main([str(a) for a in args])


def train_tiny(
    out: Path, corpus: dict, family: str = "gpt2", lora: bool = False, steps: int = 30, *extra: str
) -> Path:
    """A real `finetune train` of a tiny model, in-process; returns the run folder."""
    code = run_cli(
        "train",
        DEMO,
        f"model.architecture={family}",
        tiny_config_arg(family),
        f"data.train={corpus['train']}",
        f"data.validation={corpus['validation']}",
        f"lora.enabled={str(lora).lower()}",
        f"training.output_dir={out}",
        f"training.max_steps={steps}",
        "training.eval_steps=15",
        "training.save_steps=15",
        "tokenizer.train_vocab_size=512",
        *extra,
    )
    assert code == 0
    return out


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, corpus) -> Path:
    """A finished tiny full fine-tune (GPT-2), shared by tests that only read it."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "full", corpus)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, corpus) -> Path:
    """A finished tiny LoRA run on a random GPT-2 base, shared by tests that only read it."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "lora", corpus, lora=True)
