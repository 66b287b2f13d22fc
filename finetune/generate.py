"""Text generation from a run folder (full or LoRA, unmerged) or any local model folder."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError


def load_for_inference(run: str):
    """(model, tokenizer) from a run or model folder, in eval mode on the best device."""
    import torch
    from transformers import AutoTokenizer

    from finetune.model import finish_tokenizer, load_run_model

    path = Path(run)
    if not path.is_dir():
        raise FinetuneError(f"run folder not found: {run}")
    model = load_run_model(path)
    tokenizer = finish_tokenizer(AutoTokenizer.from_pretrained(str(path)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def generate(run: str, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
             seed: int = 0) -> str:
    """The prompt and its continuation; the same seed gives the same text."""
    import torch
    from transformers import set_seed

    model, tokenizer = load_for_inference(run)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    if inputs["input_ids"].shape[1] == 0:
        raise FinetuneError("--prompt is empty; give some text to continue")
    set_seed(seed)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0], skip_special_tokens=True)
