"""`finetune check`: resolve and validate a recipe without loading weights."""

from __future__ import annotations

from finetune import corpus
from finetune.config import load_recipe
from finetune.errors import FinetuneError


def check(path: str, overrides: list[str]) -> dict:
    recipe = load_recipe(path, overrides)
    report = {"recipe": path, "output_dir": str(recipe.output_dir)}
    corpus.resolve(recipe.data.train, "data.train")
    if recipe.data.validation:
        corpus.resolve(recipe.data.validation, "data.validation")
    from finetune.model import context_length, resolve_config
    from finetune.net import hub_reachable
    from finetune.train import check_block_size

    try:
        config = resolve_config(recipe.model)
    except FinetuneError as exc:
        if hub_reachable() or "Hugging Face hub" not in str(exc):
            raise
        report["model"] = f"{recipe.model.name} (config needs the hub, which is out of reach)"
    else:
        check_block_size(recipe, config)
        report["model"] = f"{config.model_type}, context {context_length(config)}"
    for key, value in report.items():
        print(f"{key:>10}: {value}")
    print("recipe is valid")
    return report
