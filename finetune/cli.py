"""The `finetune` command line. Exit codes: 0 success, 2 invalid recipe or input, 1 anything else."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from finetune.errors import FinetuneError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Fine-tune GPT-2, GPT-Neo and GPT-J from a recipe (one YAML file).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_command(name: str, help: str):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="override a recipe key: dotted path, value parsed as YAML")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
        return p

    p = recipe_command("train", "train a model as the recipe says")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output folder (its checkpoints are kept)")
    p.set_defaults(func=cmd_train)

    p = recipe_command("check", "resolve and validate a recipe without training")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("generate", help="generate text from a run or model folder")
    p.add_argument("run", metavar="RUN", help="run folder (full or LoRA) or model folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge a LoRA run's adapter into RUN/merged/")
    p.add_argument("run", metavar="RUN", help="LoRA run folder")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("push", help="publish a run on the Hugging Face hub, with a model card",
                       description="Build RUN/upload/ (safetensors, config, tokenizer, "
                       "generation_config.json, recipe.yaml, metrics.json, samples, README.md "
                       "card) and upload it. The token comes from HF_TOKEN or `hf auth login`.")
    p.add_argument("run", metavar="RUN", help="run folder (full or LoRA)")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="model repo to push to")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--merged", action="store_true",
                   help="LoRA run: upload the adapter merged into its base (default: the adapter)")
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if needed)")
    p.add_argument("--commit-message", metavar="MESSAGE")
    p.add_argument("--dry-run", action="store_true",
                   help="only build the upload folder, contact nothing; prints its path last")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = build_parser().parse_args(argv)
    if not args.debug:  # library deprecation chatter is not for users of the CLI
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return args.func(args) or 0
    except FinetuneError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"finetune: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Tear the process group down ourselves: leaving it to interpreter exit can abort (SIGABRT)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from finetune.config import load_recipe
    from finetune.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe, overwrite=args.overwrite)
    return 0


def cmd_check(args) -> int:
    from finetune.check import check

    check(args.recipe, args.overrides)
    return 0


def cmd_generate(args) -> int:
    from finetune.generate import generate

    print(generate(args.run, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=args.seed))
    return 0


def cmd_merge(args) -> int:
    from finetune.lora import merge_run

    print(merge_run(args.run))
    return 0


def cmd_push(args) -> int:
    from finetune.hub import push

    push(args.run, args.repo_id, private=args.private, merged=args.merged,
         revision=args.revision, commit_message=args.commit_message, dry_run=args.dry_run)
    return 0
