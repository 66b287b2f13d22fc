"""LoRA target selection by layer type, for every family."""

import pytest

from finetune.config import LoraSpec
from finetune.errors import FinetuneError
from finetune.lora import apply_lora, projection_modules, target_modules

from .conftest import build_tiny_model

EXPECTED = {
    "gpt2": ({"c_attn"}, {"c_attn", "c_proj", "c_fc"}, "Conv1D"),
    "gpt_neo": (
        {"q_proj", "v_proj"},
        {"q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"},
        "Linear",
    ),
    "gptj": (
        {"q_proj", "v_proj"},
        {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"},
        "Linear",
    ),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_auto_and_all_targets_by_family(family):
    model = build_tiny_model(family)
    auto, every, layer_type = EXPECTED[family]
    assert set(target_modules(model, LoraSpec(target_modules="auto"))) == auto
    assert set(target_modules(model, LoraSpec(target_modules="all"))) == every
    assert set(projection_modules(model).values()) == {layer_type}
    assert not any("lm_head" in n or "wte" in n for n in projection_modules(model))


def test_a_list_that_matches_nothing_lists_what_exists():
    model = build_tiny_model("gpt2")
    with pytest.raises(FinetuneError) as info:
        target_modules(model, LoraSpec(target_modules=["q_proj"]))
    assert "q_proj matches no module" in str(info.value)
    assert "c_attn" in str(info.value)


def test_apply_lora_trains_only_adapters(capsys):
    model = apply_lora(build_tiny_model("gpt2"), LoraSpec(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert "trainable parameters" in capsys.readouterr().out
