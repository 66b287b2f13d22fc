"""The `speed:` block: attention, loss and GPU defaults as asked; quantization's errors."""

import importlib.util

import pytest
import torch

from finetune import fast
from finetune.config import build_recipe
from finetune.errors import FinetuneError
from finetune.neo_attention import GPTNeoSdpaSelfAttention

from .conftest import DEMO, build_tiny_model, run_cli

H100 = {"cuda": True, "capability": (9, 0), "family": "gpt2"}


def _recipe(family="gpt2", lora=False, speed=None, data=None, model=None):
    return build_recipe(
        {
            "model": {"architecture": family, **(model or {})},
            "data": {"train": "x.txt", **(data or {})},
            "lora": {"enabled": lora},
            "speed": speed or {},
        },
        check_training=False,
    )


@pytest.mark.parametrize(
    "lora, speed, cuda, expected",
    [
        (False, {}, False, "standard"),
        (True, {}, False, "standard"),
        (False, {}, True, "standard"),
        (True, {}, True, "chunked"),  # liger is not installed here
        (False, {"loss": "chunked"}, False, "chunked"),
        (True, {"loss": "standard"}, True, "standard"),
    ],
)
def test_loss_kind(lora, speed, cuda, expected):
    assert fast.loss_kind(_recipe(lora=lora, speed=speed), cuda=cuda) == expected


def test_gpu_defaults_fill_only_unset_keys():
    filled = fast.training_defaults(_recipe(), {"optim": "adamw_torch"}, device=H100)
    assert filled["optim"] == "adamw_torch"  # the user's choice stays
    assert filled["tf32"] and filled["torch_compile"] and filled["dataloader_pin_memory"]
    assert filled["dataloader_num_workers"] >= 1 and filled["dataloader_persistent_workers"]
    assert (
        fast.training_defaults(_recipe(), {"torch_compile": False}, H100)["torch_compile"] is False
    )


@pytest.mark.parametrize(
    "recipe, device",
    [
        (_recipe(lora=True), H100),
        (_recipe("gpt_neo"), {**H100, "family": "gpt_neo"}),
        (_recipe(data={"packing": "documents"}), H100),
        (_recipe(speed={"loss": "chunked"}), H100),
    ],
    ids=["lora", "gpt_neo", "documents", "chunked"],
)
def test_compile_only_where_it_was_measured_to_pay(recipe, device):
    assert "torch_compile" not in fast.training_defaults(recipe, {}, device)


def test_no_gpu_defaults_on_cpu_old_gpus_or_when_off():
    assert fast.training_defaults(_recipe(), {"seed": 1}, {"cuda": False}) == {"seed": 1}
    assert "tf32" not in fast.training_defaults(_recipe(), {}, {**H100, "capability": (7, 5)})
    off = _recipe(speed={"gpu_defaults": False})
    assert fast.training_defaults(off, {}, H100) == {}
    assert fast.training_defaults(_recipe(), {}) == {} or torch.cuda.is_available()


def test_gpt_neo_gets_sdpa_unless_eager_is_asked_for():
    def attention_types(model):
        return {type(block.attn.attention) for block in model.transformer.h}

    model = fast.apply(build_tiny_model("gpt_neo"), _recipe("gpt_neo"), log=lambda m: None)
    assert attention_types(model) == {GPTNeoSdpaSelfAttention}
    eager = fast.apply(
        build_tiny_model("gpt_neo"),
        _recipe("gpt_neo", speed={"attention": "eager"}),
        log=lambda m: None,
    )
    assert GPTNeoSdpaSelfAttention not in attention_types(eager)
    gpt2 = fast.apply(
        build_tiny_model("gpt2"), _recipe(speed={"attention": "eager"}), log=lambda m: None
    )
    assert gpt2.config._attn_implementation == "eager"


def test_chunked_loss_when_asked_and_no_cache_with_labels():
    torch.manual_seed(0)
    standard = build_tiny_model(
        "gpt2", vocab_size=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    chunked = build_tiny_model("gpt2", vocab_size=128)
    chunked.load_state_dict(standard.state_dict())
    messages = []
    fast.apply(standard, _recipe(), log=messages.append)
    fast.apply(chunked, _recipe(speed={"loss": "chunked"}), log=messages.append)
    assert messages == ["loss: chunked linear cross-entropy (no full fp32 logits)"]
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = standard.eval()(ids, labels=ids)
        actual = chunked.eval()(ids, labels=ids)
        generating = standard(ids)
    assert actual.logits is None and expected.logits is not None
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert expected.past_key_values is None and generating.past_key_values is not None


def test_fused_loss_needs_a_gpu_and_liger():
    with pytest.raises(FinetuneError, match="speed.loss=fused needs a CUDA GPU and liger-kernel"):
        fast.check(_recipe(speed={"loss": "fused"}), cuda=False)


def test_quantization_needs_lora_and_pretrained_weights():
    with pytest.raises(FinetuneError, match="model.quantization=4bit needs lora.enabled=true"):
        _recipe(model={"quantization": "4bit"})
    with pytest.raises(FinetuneError, match="needs pretrained weights"):
        _recipe(lora=True, model={"quantization": "8bit"})
    with pytest.raises(FinetuneError, match="model.quantization: expected one of '4bit', '8bit'"):
        _recipe(lora=True, model={"quantization": "3bit"})


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here"
)
def test_quantization_without_bitsandbytes_names_the_extra():
    from finetune.quantize import check_available

    with pytest.raises(FinetuneError, match=r"pip install 'finetune\[gpu\]'"):
        check_available("8bit", cuda=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_quantization_on_cpu_is_one_line_exit_2(tmp_path, capsys):
    build_tiny_model("gpt2").save_pretrained(tmp_path / "base")
    capsys.readouterr()  # the save's progress bar
    code = run_cli(
        "train",
        DEMO,
        "model.architecture=null",
        f"model.name={tmp_path / 'base'}",
        "model.config={}",
        "lora.enabled=true",
        "model.quantization=4bit",
        f"training.output_dir={tmp_path / 'run'}",
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "finetune: error: model.quantization=4bit needs a CUDA GPU (bitsandbytes); "
        "remove it (model.quantization=null) to train LoRA on unquantized weights here"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("trainer_counts", [False, True])
def test_host_token_count_equals_trainers_own(tmp_path, trainer_counts):
    """Partial last batches, two epochs, gradient accumulation: the host count is exact."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return 11  # batches of 4, 4, 3

        def __getitem__(self, i):
            ids = torch.arange(i, i + 16)
            return {"input_ids": ids, "labels": ids}

    def tokens(trainer_class, include):
        args = TrainingArguments(
            output_dir=str(tmp_path / include),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            num_train_epochs=2,
            include_num_input_tokens_seen=include,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
        )
        model = build_tiny_model("gpt2", vocab_size=64)
        trainer = trainer_class(
            model=model, args=args, train_dataset=Blocks(), data_collator=default_data_collator
        )
        trainer.train()
        return trainer.state.num_input_tokens_seen

    reference = tokens(Trainer, "all")
    assert reference == 2 * 11 * 16
    # With the recipe asking Trainer to count, ours steps aside (no double count).
    assert tokens(fast.trainer_class(), "all" if trainer_counts else "no") == reference


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_fast_paths_compile_and_match_eager(family):
    """`torch_compile` (a GPU default for GPT-2) traces the SDPA patch and the padding mask."""
    import copy

    from finetune import vocab

    torch.manual_seed(0)
    reference = build_tiny_model(family, vocab_size=500).eval()
    reference.loss_type = "ForCausalLM"
    model = fast.apply(
        copy.deepcopy(reference), _recipe(family, speed={"pad_vocab": 64}), log=lambda m: None
    )
    assert vocab.real_vocab_size(model) == 500 and model.config.vocab_size == 512
    ids = torch.randint(0, 500, (2, 100), generator=torch.Generator().manual_seed(1))

    compiled = torch.compile(model)(ids, labels=ids)
    compiled.loss.backward()
    expected = reference(ids, labels=ids)
    expected.loss.backward()

    torch.testing.assert_close(compiled.loss, expected.loss, rtol=1e-5, atol=1e-5)
    grad = model.get_input_embeddings().weight.grad[:500]
    torch.testing.assert_close(
        grad, reference.get_input_embeddings().weight.grad, rtol=1e-4, atol=1e-6
    )


def test_kbit_preparation_gets_only_checkpoint_kwargs(monkeypatch):
    """Trainer's own checkpointing keys (every_n_layers, offload) are not torch's."""
    import peft
    from transformers import TrainingArguments

    from finetune.quantize import prepare_for_lora

    seen = {}
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda m, **kw: seen.update(kw))
    args = TrainingArguments(
        output_dir="unused",
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": 2},
        report_to="none",
    )
    prepare_for_lora(object(), args)
    assert seen == {
        "use_gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }
