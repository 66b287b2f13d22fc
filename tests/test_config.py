"""Recipes: overrides, strict keys with suggestions, types, cross-field rules, shipped recipes."""

from pathlib import Path

import pytest
import yaml

from finetune.config import apply_override, build_recipe, load_recipe, reference_markdown
from finetune.errors import FinetuneError

from .conftest import DEMO, ROOT


def test_overrides_parse_values_as_yaml():
    raw = {"training": {"max_steps": 5}}
    apply_override(raw, "lora.r=16")
    apply_override(raw, "model.config={n_layer: 2, n_embd: 64}")
    apply_override(raw, "training.max_steps=null")
    apply_override(raw, "data.train=a=b.txt")
    assert raw["lora"]["r"] == 16
    assert raw["model"]["config"] == {"n_layer": 2, "n_embd": 64}
    assert raw["training"]["max_steps"] is None
    assert raw["data"]["train"] == "a=b.txt"


@pytest.mark.parametrize("bad", ["lora.r", "=3", "a..b=1"])
def test_malformed_override_is_an_error(bad):
    with pytest.raises(FinetuneError, match="KEY.PATH=VALUE"):
        apply_override({}, bad)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.rnak=4", "unknown key lora.rnak: did you mean lora.r?"),
        ("trainig.max_steps=3", "unknown key trainig: did you mean training?"),
        ("data.blocksize=64", "unknown key data.blocksize: did you mean data.block_size?"),
        ("training.learnin_rate=1", "did you mean training.learning_rate?"),
        ("model.nmae=gpt2", "did you mean model.name?"),
        ("model.architecture=gpt-neo", "got 'gpt-neo'; did you mean gpt_neo?"),
        ("speed.loss=chunk", "did you mean chunked?"),
    ],
)
def test_unknown_keys_name_the_path_and_the_closest_key(override, expected):
    with pytest.raises(FinetuneError) as info:
        load_recipe(DEMO, [override])
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("lora.r=abc", "lora.r: expected an integer"),
        ("data.block_size=1.5", "data.block_size: expected an integer"),
        ("lora.enabled=maybe", "lora.enabled: expected true or false"),
        ("model.architecture=llama", "one of 'gpt2', 'gpt_neo', 'gptj'"),
        ("training.learning_rate=fast", "training.learning_rate: expected a number"),
        ("training.learning_rate=-0.1", "learning_rate must be positive"),
        ("data.validation_split=1.5", "between 0 and 1"),
        ("data.block_size=0", "block_size must be positive"),
        ("model.name=gpt2", "exactly one of model.name"),
        ("training.lr_scheduler_type=sideways", "training:"),
    ],
)
def test_wrong_values_are_errors(override, fragment):
    with pytest.raises(FinetuneError, match=None) as info:
        load_recipe(DEMO, [override])
    assert fragment in str(info.value)


def test_yaml_strings_for_floats_are_accepted(tmp_path):
    recipe = load_recipe(DEMO, ["training.learning_rate=5e-5"])  # YAML 1.1 reads this as text
    assert recipe.training["learning_rate"] == pytest.approx(5e-5)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: gpt2\n  config: {a: 1\n")
    with pytest.raises(FinetuneError, match=r"YAML syntax error at line \d+, column \d+"):
        load_recipe(path)


def test_missing_recipe_file():
    with pytest.raises(FinetuneError, match="recipe file not found"):
        load_recipe("nope.yaml")


def test_tokens_are_refused_in_recipes():
    with pytest.raises(FinetuneError, match="do not put tokens in a recipe") as info:
        load_recipe(DEMO, ["training.hub_token=hf_secret123"])
    assert "hf_secret123" not in str(info.value)


def test_resolved_recipe_round_trips():
    recipe = load_recipe(DEMO, ["lora.enabled=true"])
    text = recipe.to_yaml()
    again = build_recipe(yaml.safe_load(text))
    assert again.lora.enabled is True
    assert again.model == recipe.model


SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_recipe_is_valid_and_says_how_to_run_it(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("finetune" in first or "make" in first)
    recipe = load_recipe(path)
    assert recipe.training["output_dir"].startswith("runs/")


def test_accelerate_configs_cover_single_multi_and_fsdp():
    kinds = {
        yaml.safe_load(p.read_text())["distributed_type"]
        for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")
    }
    assert {"NO", "MULTI_GPU", "FSDP"} <= kinds


def test_readme_reference_matches_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "README is stale: run `make docs`"
