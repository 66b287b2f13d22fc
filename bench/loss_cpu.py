"""CPU: transformers' standard loss against the chunked linear cross-entropy, one process.

    .venv/bin/python bench/loss_cpu.py [VOCAB ...]      (default: 1024 12712 50257)

A GPT-2 of 4 layers x 256 at batch 8 x 256; forward + backward of the two models interleaved,
median of 6 steps after 2 warm-up steps, milliseconds per step.
"""

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.loss import patch_model_for_chunked_loss  # noqa: E402


def measure(vocab: int, steps: int = 8, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4,
        n_embd=256,
        n_head=4,
        n_positions=256,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
    )
    standard = GPT2LMHeadModel(config)
    chunked = patch_model_for_chunked_loss(copy.deepcopy(standard))
    ids = torch.randint(0, vocab, (8, 256))
    times = {"standard": [], "chunked": []}
    for _ in range(steps):
        for name, model in (("standard", standard), ("chunked", chunked)):
            start = time.perf_counter()
            model(ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t[warmup:]) * 1e3, 1) for name, t in times.items()}


if __name__ == "__main__":
    for vocab in [int(v) for v in sys.argv[1:]] or [1024, 12712, 50257]:
        print(vocab, measure(vocab), f"ms/step, {torch.get_num_threads()} threads", flush=True)
