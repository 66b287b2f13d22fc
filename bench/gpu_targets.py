"""The GPU targets of issue 6, as `finetune bench` runs: prepared for a session with a GPU.

    .venv/bin/python bench/gpu_targets.py [--tiny] [--only gpt2,gpt_neo,gptj] [--out DIR]

GPU machines cannot reach the hub, so, as ../shared/bench/anchor_gpu.py does, the models are
randomly initialised at their real sizes (same FLOPs as the pretrained weights). Their vocabulary
must be GPT-2's 50257 tokens: a byte-level BPE trained on tinyshakespeare (12.7k tokens) is padded
with unused added tokens up to 50257, so the embeddings and the head have the real shapes.

- gpt2: GPT-2 124M full fine-tune, block 1024, batch 16 (target >= 450k tokens/s on an H200,
  >= 4.7x the run_clm baseline, which `finetune bench` runs in the same process);
- gpt2_unpadded: the same with `speed.pad_vocab=1` and no baseline: what vocabulary padding
  (50257 -> 50304 rows, on by default there) is worth through finetune;
- gpt_neo: GPT-Neo 125M full fine-tune, block 1024, batch 16 (>= 300k tokens/s, <= 15 GiB);
- gpt_neo_compiled: the same with `training.torch_compile=true`, no baseline (whether compile
  pays for Neo's SDPA patch, and should become its default as it is GPT-2's);
- gptj: GPT-J 6B LoRA r16 q/v, block 1024, batch 4, activation checkpointing, 4-bit base
  (<= 10 GiB peak): the random bf16 weights are saved first (12 GB, minutes), since a quantized
  base must be loaded from weights. Needs bitsandbytes (the `gpu` extra);
- gptj_bf16: the same LoRA on the bf16 base, no baseline (>= 10k tokens/s).

`--tiny` runs the same plan with tiny configs, on CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
GPT2_VOCAB = 50257

GPT2 = {
    "family": "gpt2",
    "config": {},
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "batch": 16,
    "overrides": [],
}
GPT_NEO = {
    "family": "gpt_neo",
    "config": {
        "num_layers": 12,
        "hidden_size": 768,
        "num_heads": 12,
        "max_position_embeddings": 2048,
    },
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_heads": 2},
    "batch": 16,
    "overrides": [],
}
GPTJ_LORA = {
    "family": "gptj",
    "config": {},
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 16},
    "batch": 4,
    "overrides": [
        "lora.enabled=true",
        "lora.r=16",
        "lora.alpha=32",
        "training.activation_checkpointing=true",
    ],
}
NO_BASELINE = {"flags": ["--no-baseline"]}  # the family's first plan measured it already

PLANS = {
    "gpt2": GPT2,
    "gpt2_unpadded": {**GPT2, **NO_BASELINE, "overrides": ["speed.pad_vocab=1"]},
    "gpt_neo": GPT_NEO,
    # compile is a default for GPT-2 only until measured for Neo
    "gpt_neo_compiled": {**GPT_NEO, **NO_BASELINE, "overrides": ["training.torch_compile=true"]},
    "gptj": {**GPTJ_LORA, "quantization": "4bit"},
    # the same LoRA on the bf16 base (the anchor's 10k tokens/s at 15 GiB)
    "gptj_bf16": {**GPTJ_LORA, **NO_BASELINE},
}


def padded_tokenizer(folder: Path, vocab: int, corpus: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from finetune.model import train_tokenizer

    tokenizer = train_tokenizer([corpus.read_text(encoding="utf-8")], vocab)
    tokenizer.add_tokens([f"<|unused{i}|>" for i in range(vocab - len(tokenizer))])
    assert len(tokenizer) == vocab, len(tokenizer)
    tokenizer.save_pretrained(folder)
    return folder


def saved_gptj(folder: Path, config: dict, vocab: int) -> Path:
    """Random GPT-J weights in bf16 on disk, so that the 4-bit path can load them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    cfg = AutoConfig.for_model("gptj", vocab_size=vocab, **config)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # 12 GB the bench subprocesses need more
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--corpus", type=Path, default=SHAKESPEARE, help="the text to train on and tokenize"
    )
    parser.add_argument("--only", default=",".join(PLANS))
    parser.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-targets-"))
    block = 64 if args.tiny else 1024
    vocab = 1024 if args.tiny else GPT2_VOCAB
    if not args.corpus.is_file():
        sys.exit(f"gpu_targets: no corpus at {args.corpus}; pass --corpus PATH")
    tokenizer = padded_tokenizer(work / "tokenizer", vocab, args.corpus)
    recipe = work / "recipe.yaml"
    recipe.write_text(
        f"tokenizer: {{name: {tokenizer}}}\n"
        f"data: {{train: {args.corpus}, validation_split: 0.05, "
        f"block_size: {block}, cache_dir: {work / 'cache'}}}\n"
    )
    results = {}
    for name in args.only.split(","):
        plan = PLANS[name]
        family = plan["family"]
        config = plan["tiny"] if args.tiny else plan["config"]
        config = {
            **config,
            "n_positions" if family != "gpt_neo" else "max_position_embeddings": max(
                block, config.get("max_position_embeddings", 0)
            ),
        }
        model = [f"model.architecture={family}", f"model.config={json.dumps(config)}"]
        if family == "gptj":
            weights = saved_gptj(work / "gptj", config, vocab)
            model = [f"model.name={weights}"]
            if plan.get("quantization") and not args.tiny:  # bitsandbytes needs CUDA
                model.append(f"model.quantization={plan['quantization']}")
        command = [
            sys.executable,
            "-m",
            "finetune",
            "bench",
            str(recipe),
            *model,
            *plan["overrides"],
            f"training.per_device_train_batch_size={plan['batch']}",
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--json",
            *plan.get("flags", []),
        ]
        print("$", " ".join(command), flush=True)
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-3:]}
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        results[name]["command"] = " ".join(command)
        print(json.dumps(results[name]), flush=True)
        # After each plan: a time limit that stops the script keeps the figures measured so far.
        (out / "gpu_targets.json").write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)  # GPT-J's saved weights are 12 GB


if __name__ == "__main__":
    main()
