"""`finetune bench RECIPE`: training throughput as `finetune train` runs it, against plain Trainer.

Both runs happen in one process, on the recipe's data blocks, for the same number of steps:

- finetune: the model, TrainingArguments and data exactly as `finetune train` builds them
  (`speed:` fast paths, GPU defaults, `data.packing`).
- baseline: `transformers.Trainer` with run_clm's defaults: TrainingArguments' defaults with
  batch 8 (fp32, no compile, no dataloader workers), TF32 matmuls where the GPU has them (as in
  ../shared/bench/anchor_gpu.py, whose 95k tokens/s the targets' ratios were set against; set
  explicitly, since TF32 is process-wide and the finetune run before may have switched it on),
  transformers' own attention and loss
  (GPT-Neo eager), concatenated blocks, `default_data_collator`. The model is the recipe's, with
  its LoRA adapters and gradient checkpointing if it has them, but never quantized.

Figures: tokens/s = tokens per optimizer step (batch x accumulation x block; blocks are never
padded) / the median step time over the steps after warm-up (so compilation is excluded).
MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak, with FLOPs per token
= 6N + 12·L·d·T (N parameters, L layers, width d, T the block size; for LoRA, 6N overstates the
work, as frozen weights get no weight gradients). Peak memory: CUDA's max allocated, or on CPU
the process's peak resident set (reset before each run).
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from finetune.config import Recipe, load_recipe
from finetune.errors import FinetuneError
from finetune.prepare import training_seed

# Dense bf16 peaks (TFLOP/s) from the vendors' data sheets, matched against the device name.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))
RUN_CLM_BATCH_SIZE = 8


def bench_command(
    path: str,
    overrides: list[str],
    steps: int,
    warmup: int,
    baseline: bool = True,
    as_json: bool = False,
) -> dict:
    if steps < 2 or warmup < 1:
        raise FinetuneError("bench needs --steps of at least 2 and --warmup of at least 1")
    recipe = load_recipe(path, overrides)
    result = bench(recipe, steps, warmup, baseline)
    print(json.dumps(result) if as_json else format_report(result))
    return result


def bench(recipe: Recipe, steps: int, warmup: int, baseline: bool = True) -> dict:
    import torch

    from finetune import data as data_lib
    from finetune import fast
    from finetune import model as model_lib
    from finetune.train import check_block_size

    config = model_lib.resolve_config(recipe.model)
    check_block_size(recipe, config)
    fast.check(recipe)
    tokenizer = model_lib.build_tokenizer(recipe, log=lambda message: None)
    seed = training_seed(recipe)
    prepared = data_lib.prepare(recipe.data, tokenizer, seed, progress=False)
    data_lib.check_blocks(prepared, recipe.data.block_size)
    total = warmup + steps + 1  # step-end times bound warmup + steps intervals
    runs = {"finetune": _run(recipe, config, tokenizer, prepared, total, warmup, plain=False)}
    if baseline:
        runs["baseline"] = _run(recipe, config, tokenizer, prepared, total, warmup, plain=True)
    result = {
        "recipe": recipe.source,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "block_size": recipe.data.block_size,
        "steps": steps,
        "warmup": warmup,
        "flops_formula": "6N + 12·L·d·T",
        **runs,
    }
    if baseline:
        result["speedup"] = round(
            runs["finetune"]["tokens_per_s"] / runs["baseline"]["tokens_per_s"], 3
        )
    return result


def _run(recipe: Recipe, config, tokenizer, prepared, total: int, warmup: int, plain: bool):
    import copy

    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import is_torch_tf32_available

    from finetune import fast, packing
    from finetune import model as model_lib
    from finetune.data import BlockDataset
    from finetune.train import training_arguments

    seed = training_seed(recipe)
    out = tempfile.mkdtemp(prefix="finetune-bench-")
    quiet = {
        "output_dir": out,
        "max_steps": total,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }
    set_seed(seed)
    if plain:
        plain_recipe = copy.deepcopy(recipe)
        plain_recipe.model.quantization = None
        plain_recipe.model.dtype = "float32"
        model = model_lib.load_model(plain_recipe, copy.deepcopy(config), tokenizer)
        model = _lora(plain_recipe, model, None)
        args = TrainingArguments(
            per_device_train_batch_size=RUN_CLM_BATCH_SIZE,
            seed=seed,
            dataloader_pin_memory=torch.cuda.is_available(),  # no-op on CPU
            tf32=True if is_torch_tf32_available() else None,  # see the module's docstring
            activation_checkpointing=_checkpointing(recipe),
            **quiet,
        )
        dataset = BlockDataset(prepared.train.blocks(recipe.data.block_size))
    else:
        bench_recipe = copy.deepcopy(recipe)
        bench_recipe.training = {**recipe.training, **quiet}
        for key in ("resume_from_checkpoint", "load_best_model_at_end", "push_to_hub"):
            bench_recipe.training.pop(key, None)  # a benchmark saves, evaluates and pushes nothing
        args = training_arguments(bench_recipe)
        model = model_lib.load_model(recipe, copy.deepcopy(config), tokenizer)
        model = fast.apply(_lora(recipe, model, args), recipe, log=lambda m: None)
        dataset = packing.block_dataset(prepared.train, recipe.data)
    model.loss_type = getattr(model, "loss_type", None) or "ForCausalLM"
    timer = _step_timer()
    trainer = (Trainer if plain else fast.trainer_class())(  # the class `finetune train` uses
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)  # the end-of-training metrics are not ours
    cuda = torch.cuda.is_available()
    _reset_peak_memory(cuda)
    trainer.train()
    intervals = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)][warmup:]
    step = statistics.median(intervals)
    tokens_per_step = (
        args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * recipe.data.block_size
        * args.world_size
    )
    tokens_per_s = tokens_per_step / step
    flops = flops_per_token(model, config, recipe.data.block_size)
    peak = peak_tflops()
    result = {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms": round(step * 1e3, 2),
        "batch": args.per_device_train_batch_size,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "compile": bool(args.torch_compile),
        "parameters": _parameters(model),
        "flops_per_token": flops,
        "mfu": round(tokens_per_s * flops / (peak * 1e12), 4) if peak else None,
        "peak_memory_gib": _peak_memory_gib(cuda),
    }
    del trainer, model
    gc.collect()  # the fast paths' forward closures hold the model in a reference cycle
    shutil.rmtree(out, ignore_errors=True)
    if cuda:
        torch.cuda.empty_cache()
    return result


def _checkpointing(recipe: Recipe) -> bool:
    """Whether the recipe checkpoints activations (a memory necessity the baseline keeps)."""
    training = recipe.training
    return bool(training.get("activation_checkpointing", training.get("gradient_checkpointing")))


def _lora(recipe: Recipe, model, args):
    """The LoRA wrapping `finetune train` does (quantized bases prepared first)."""
    if not recipe.lora.enabled:
        return model
    from finetune.lora import apply_lora

    if recipe.model.quantization and args is not None:
        from finetune.quantize import prepare_for_lora

        model = prepare_for_lora(model, args)
    return apply_lora(model, recipe.lora, log=lambda m: None)


def _step_timer():
    """A callback noting the wall-clock time at the end of every optimizer step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels are done, not only queued
            self.ends.append(time.perf_counter())

    return StepTimer()


# --------------------------------------------------------------------------- figures


def flops_per_token(model, config, block_size: int) -> int:
    """6N + 12·L·d·T: forward and backward matmuls (6N) plus attention scores (12·L·d·T)."""
    layers, width = config.num_hidden_layers, config.hidden_size
    return 6 * _parameters(model) + 12 * layers * width * block_size


def _parameters(model) -> int:
    get_base_model = getattr(model, "get_base_model", None)
    lm = get_base_model() if callable(get_base_model) else model
    return int(lm.num_parameters())  # counts 4-bit packed weights at their real size


def peak_tflops(name: str | None = None) -> float | None:
    """Dense bf16 peak of this GPU in TFLOP/s, or None (CPU, or a GPU not in the table)."""
    if name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for marker, tflops in PEAK_BF16_TFLOPS:
        if marker in name:
            return tflops
    return None


def _reset_peak_memory(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def _peak_memory_gib(cuda: bool) -> float | None:
    if cuda:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return round(int(found.group(1)) / 2**20, 3) if found else None


def format_report(result: dict) -> str:
    memory = "peak GiB" if result["device"] != "cpu" else "peak RSS GiB"
    lines = [
        f"finetune bench: {result['recipe']} on {result['device']}, block {result['block_size']}, "
        f"median of {result['steps']} steps after {result['warmup']} warm-up",
        f"FLOPs per token = {result['flops_formula']} = {result['finetune']['flops_per_token']:,}"
        f" (N = {result['finetune']['parameters']:,} parameters); MFU against the GPU's dense "
        "bf16 peak",
        f"{'':<20}{'tokens/s':>12}{'MFU':>8}{memory:>14}{'step ms':>10}{'batch':>7}  precision",
    ]
    for name in ("finetune", "baseline"):
        run = result.get(name)
        if run is None:
            continue
        label = "finetune" if name == "finetune" else "baseline (run_clm)"
        mfu = f"{100 * run['mfu']:.1f}%" if run["mfu"] is not None else "n/a"
        memory_value = run["peak_memory_gib"]
        shown = f"{memory_value:.2f}" if memory_value is not None else "n/a"
        precision = run["precision"] + (" + compile" if run["compile"] else "")
        lines.append(
            f"{label:<20}{run['tokens_per_s']:>12,.0f}{mfu:>8}{shown:>14}"
            f"{run['step_ms']:>10.1f}{run['batch']:>7}  {precision}"
        )
    if "speedup" in result:
        lines.append(f"speed-up over the baseline: {result['speedup']:.2f}x")
    return "\n".join(lines)
