"""Run by tests under torchrun: `finetune train`, printing each process's model wrapper and a
checksum of its weights just before saving. Usage: ddp_probe.py OUTPUT_DIR [KEY=VALUE ...]"""

import os
import sys

import torch.distributed as dist

from finetune import train
from finetune.config import load_recipe

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "offline-demo.yaml")
save_run = train.save_run


def probing_save_run(trainer, recipe, metrics):
    model = trainer.accelerator.unwrap_model(trainer.model)
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    wrapper = type(trainer.model_wrapped).__name__
    print(f"probe rank={trainer.args.process_index} wrapper={wrapper} checksum={checksum!r}")
    return save_run(trainer, recipe, metrics)


train.save_run = probing_save_run
train.train(load_recipe(RECIPE, [f"training.output_dir={sys.argv[1]}", *sys.argv[2:]]))
if dist.is_initialized():
    dist.destroy_process_group()
