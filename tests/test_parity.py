"""Same tokenizer, config, data, schedule and seed: our pipeline matches a run_clm-style one."""

import json

import pytest

from .conftest import TINY, train_tiny


def _run_clm_style_eval_loss(run, corpus, tmp_path) -> float:
    """tokenize -> concatenate -> chunk with datasets.map, then a plain Trainer, as run_clm does."""
    from datasets import Dataset
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(run))
    block = 64

    def group(examples):
        ids = sum(examples["input_ids"], [])
        n = len(ids) // block * block
        chunks = [ids[i : i + block] for i in range(0, n, block)]
        return {"input_ids": chunks, "labels": [list(c) for c in chunks]}

    def dataset(path):
        raw = Dataset.from_dict({"text": [path.read_text()]})
        tokens = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
        tokens = tokens.remove_columns([c for c in tokens.column_names if c != "input_ids"])
        return tokens.map(group, batched=True)

    set_seed(42)
    config = AutoConfig.for_model(
        "gpt2",
        **TINY["gpt2"],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    args = TrainingArguments(
        output_dir=str(tmp_path / "ref"),
        max_steps=40,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        weight_decay=0.01,
        seed=42,
        report_to="none",
        save_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(corpus["train"]),
        eval_dataset=dataset(corpus["validation"]),
        data_collator=default_data_collator,
    )
    trainer.train()
    return trainer.evaluate()["eval_loss"]


@pytest.mark.slow
def test_eval_loss_matches_a_run_clm_style_pipeline(tmp_path, corpus):
    run = train_tiny(tmp_path / "ours", corpus, "gpt2", False, 40)
    ours = json.loads((run / "metrics.json").read_text())["eval_loss"]
    reference = _run_clm_style_eval_loss(run, corpus, tmp_path)
    assert ours == pytest.approx(reference, rel=0.03)
