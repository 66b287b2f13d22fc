"""4-bit and 8-bit frozen bases for LoRA (`model.quantization`), through bitsandbytes.

The base is loaded quantized (4-bit: NF4 with double quantization, computing in bf16 where the
GPU has it), then `peft.prepare_model_for_kbit_training` readies it: layer norms and the head
in fp32, input gradients on so gradient checkpointing works. Only the LoRA adapters train.
"""

from __future__ import annotations

import importlib.util
import os

from finetune.errors import FinetuneError


def check_available(setting: str, cuda: bool) -> None:
    """One-line errors for machines that cannot load quantized weights."""
    if not cuda:
        raise FinetuneError(
            f"model.quantization={setting} needs a CUDA GPU (bitsandbytes); remove it "
            "(model.quantization=null) to train LoRA on unquantized weights here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FinetuneError(
            f"model.quantization={setting} needs bitsandbytes: pip install 'finetune[gpu]'"
        )


def load_kwargs(setting: str | None) -> dict:
    """Extra `from_pretrained` arguments that load the weights quantized (none when unset)."""
    if not setting:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    check_available(setting, torch.cuda.is_available())
    if setting == "4bit":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # Each process holds a whole copy on its own GPU (data parallel).
    return {
        "quantization_config": config,
        "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))},
    }


def prepare_for_lora(model, args):
    """`peft.prepare_model_for_kbit_training`, honouring `training.activation_checkpointing`."""
    from peft import prepare_model_for_kbit_training

    # Trainer's own keys (which layers, CPU offload) are not torch.utils.checkpoint's: Trainer
    # applies them itself when it turns checkpointing on again.
    kwargs = {
        k: v
        for k, v in (args.activation_checkpointing_kwargs or {}).items()
        if k not in ("every_n_layers", "offload")
    }
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=bool(args.activation_checkpointing),
        gradient_checkpointing_kwargs=kwargs or None,
    )
