"""Text generation from a run folder (full or LoRA, unmerged) or any local model folder.

`sample` is the one place text is generated: the CLI, the Python API and the samples written during
training all call it, so the same prompts, settings and seed give the same text everywhere.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from finetune.errors import FinetuneError


def load_for_inference(run: str | Path):
    """(model, tokenizer) from a run or model folder, in eval mode on the best device."""
    import torch
    from transformers import AutoTokenizer

    from finetune.model import finish_tokenizer, load_run_model

    path = Path(run)
    if not path.is_dir():
        raise FinetuneError(f"run folder not found: {run} (give a run folder or a model folder)")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any((path / name).is_file() for name in tokenizer_files):
        raise FinetuneError(f"{run} holds no tokenizer: give a run folder or a saved model folder")
    with warnings.catch_warnings():  # PEFT's deprecation chatter while loading adapters
        warnings.simplefilter("ignore", FutureWarning)
        model = load_run_model(path)
    tokenizer = finish_tokenizer(AutoTokenizer.from_pretrained(str(path)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def check_settings(
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    num_samples: int = 1,
    prefix: str = "",
) -> None:
    """Raise naming the setting as the user wrote it: prefix "eval." (recipe) or "--" (CLI)."""

    def name(key: str) -> str:
        return f"--{key.replace('_', '-')}" if prefix == "--" else f"{prefix}{key}"

    if max_new_tokens < 1:
        raise FinetuneError(f"{name('max_new_tokens')} must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise FinetuneError(f"{name('temperature')} must be 0 (greedy) or more, got {temperature}")
    if top_k < 0:
        raise FinetuneError(f"{name('top_k')} must be 0 (off) or more, got {top_k}")
    if not 0 < top_p <= 1:
        raise FinetuneError(f"{name('top_p')} must be in (0, 1] (1 = off), got {top_p}")
    if num_samples < 1:
        raise FinetuneError(f"{name('num_samples')} must be at least 1, got {num_samples}")


def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int = 0,
    num_samples: int = 1,
) -> list[list[str]]:
    """Continuations (without the prompt) of each prompt, `num_samples` each, in one batch.

    Prompts are left-padded so every continuation starts right after its prompt; the attention
    mask hides the padding. The seed drives a private copy of the random state, so calling this
    during training leaves the training's own randomness untouched.
    """
    import torch
    from transformers import GenerationConfig

    check_settings(max_new_tokens, temperature, top_k, top_p, num_samples)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    for number, ids in enumerate(encoded, start=1):
        if not ids:
            raise FinetuneError(f"prompt {number} is empty; give some text to continue")
        if limit and len(ids) + max_new_tokens > limit:
            raise FinetuneError(
                f"prompt {number} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                f"exceeds the model's context of {limit}: shorten it or lower max_new_tokens"
            )
    input_ids, attention_mask = pad_batch(encoded, tokenizer.pad_token_id, side="left")
    greedy = temperature == 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=None if greedy else top_k,
        top_p=None if greedy else top_p,
        num_return_sequences=1 if greedy else num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    per_prompt = 1 if greedy else num_samples
    grouped = [texts[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]
    return [group * num_samples if greedy else group for group in grouped]


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right"):
    """(input_ids, attention_mask) tensors; the mask, not the pad id, marks the padding."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = width - len(seq) if side == "left" else 0
        ids[row, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, start : start + len(seq)] = 1
    return ids, mask


def generate(
    run: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    seed: int = 0,
    top_k: int = 50,
    top_p: float = 0.95,
) -> str:
    """The prompt and its continuation; the same seed gives the same text."""
    if not prompt:
        raise FinetuneError("--prompt is empty; give some text to continue")
    model, tokenizer = load_for_inference(run)
    ((text,),) = sample(
        model,
        tokenizer,
        [prompt],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    return prompt + text


def generate_many(run: str, prompts: list[str], num_samples: int = 1, **settings) -> list[dict]:
    """{prompt, sample, seed, text} records, prompt by prompt; `text` is the continuation only."""
    if not prompts:
        raise FinetuneError("no prompts given: pass --prompt TEXT or a --prompts-file with lines")
    for number, prompt in enumerate(prompts, start=1):
        if not prompt.strip():
            raise FinetuneError(f"prompt {number} is empty; give some text to continue")
    model, tokenizer = load_for_inference(run)
    texts = sample(model, tokenizer, prompts, num_samples=num_samples, **settings)
    return [
        {"prompt": prompt, "sample": index, "seed": settings.get("seed", 0), "text": text}
        for prompt, samples in zip(prompts, texts, strict=True)
        for index, text in enumerate(samples)
    ]


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a text file; blank lines are skipped."""
    file = Path(path)
    if not file.is_file():
        raise FinetuneError(f"--prompts-file: file not found: {path}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FinetuneError(f"--prompts-file: {path} is not UTF-8 text") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise FinetuneError(f"--prompts-file: {path} holds no prompt (one prompt per line)")
    return prompts


def generate_cli(args) -> list[dict]:
    """`finetune generate`: print each prompt with its continuation; --out writes JSON lines."""
    import json

    check_settings(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_samples, prefix="--"
    )
    if args.prompt is not None and not args.prompt.strip():
        raise FinetuneError("--prompt is empty; give some text to continue")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
    if args.out and Path(args.out).is_dir():
        raise FinetuneError(f"--out {args.out} is a folder; name a file (e.g. samples.jsonl)")
    records = generate_many(
        args.run,
        prompts,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    for index, record in enumerate(records):
        if len(records) > 1:
            print(f"--- prompt {index // args.num_samples + 1}, sample {record['sample'] + 1}")
        print(record["prompt"] + record["text"])
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
    return records
