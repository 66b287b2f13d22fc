"""The `finetune` command line. Exit codes: 0 success, 2 invalid recipe or input, 1 otherwise."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from finetune.errors import Diverged, FinetuneError, Interrupted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Fine-tune GPT-2, GPT-Neo and GPT-J from a recipe (one YAML file).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `--debug` is accepted after the command too; SUPPRESS keeps the top-level value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )

    def recipe_command(name: str, help: str):
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="KEY=VALUE",
            help="override a recipe key: dotted path, value parsed as YAML",
        )
        return p

    p = recipe_command("train", "train a model as the recipe says")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty output folder (its checkpoints are kept)",
    )
    p.set_defaults(func=cmd_train)

    p = recipe_command("check", "preflight: validate a recipe, scan its data, estimate memory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_check)

    p = recipe_command("prepare", "tokenize and cache the recipe's data; prints the cache path")
    p.set_defaults(func=cmd_prepare)

    p = recipe_command("bench", "training tokens/s, MFU and peak memory against plain Trainer")
    p.add_argument(
        "--steps", type=int, default=10, metavar="N", help="timed optimizer steps (median reported)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        metavar="N",
        help="untimed steps first (compilation happens here)",
    )
    p.add_argument(
        "--no-baseline", action="store_true", help="skip the plain-Trainer (run_clm defaults) run"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "generate",
        parents=[common],
        help="generate text from a run or model folder",
        description="Continue prompts; the same seed gives the same text. "
        "LoRA runs load their adapter unmerged.",
    )
    p.add_argument("run", metavar="RUN_OR_MODEL", help="run folder (full or LoRA) or model folder")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="text to continue")
    prompts.add_argument("--prompts-file", metavar="FILE", help="one prompt per line")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="1.0 = off")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument(
        "--out", metavar="FILE", help="also write {prompt, sample, seed, text} JSON lines to FILE"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval",
        parents=[common],
        help="perplexity of a run or model folder on held-out text",
        description="Token-weighted perplexity, by sliding windows as in the "
        "transformers perplexity guide.",
    )
    p.add_argument("run", metavar="RUN_OR_MODEL", help="run folder (full or LoRA) or model folder")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="text to score, in data.train's forms (default: the run's validation data)",
    )
    p.add_argument(
        "--stride",
        type=int,
        metavar="N",
        help="window step in tokens (default: the window, i.e. the run's block size, "
        "which reproduces the run's own figure; smaller gives more context per token)",
    )
    p.add_argument(
        "--base",
        action="store_true",
        help="also evaluate the base model named in the run's recipe.yaml",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "merge", parents=[common], help="merge a LoRA run's adapter into RUN/merged/"
    )
    p.add_argument("run", metavar="RUN", help="LoRA run folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "push",
        parents=[common],
        help="publish a run on the Hugging Face hub, with a model card",
        description="Build RUN/upload/ (safetensors, config, tokenizer, "
        "generation_config.json, recipe.yaml, metrics.json, samples, README.md "
        "card) and upload it. The token comes from HF_TOKEN or `hf auth login`.",
    )
    p.add_argument("run", metavar="RUN", help="run folder (full or LoRA)")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="model repo to push to")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument(
        "--merged",
        action="store_true",
        help="LoRA run: upload the adapter merged into its base (default: the adapter)",
    )
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if needed)")
    p.add_argument("--commit-message", metavar="MESSAGE")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only build the upload folder, contact nothing; prints its path last",
    )
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = parse_args(argv)
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
    except Interrupted as exc:
        print(f"finetune: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except Diverged as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"finetune: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        _end_process_group()


def parse_args(argv: list[str] | None):
    """Like parse_args, but KEY=VALUE overrides may also follow flags (`train R --overwrite k=v`):
    argparse ends a positional list at the first flag and leaves the rest unrecognised."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(_is_override(e) for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _end_process_group() -> None:
    """Tear the process group down ourselves: leaving it to interpreter exit can abort (SIGABRT)."""
    if "torch" not in sys.modules:
        return  # nothing started one; importing torch to check costs seconds (finetune prepare)
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

    check(args.recipe, args.overrides, as_json=args.json)
    return 0


def cmd_prepare(args) -> int:
    from finetune.prepare import prepare_command

    prepare_command(args.recipe, args.overrides)
    return 0


def cmd_bench(args) -> int:
    from finetune.bench import bench_command

    bench_command(
        args.recipe,
        args.overrides,
        steps=args.steps,
        warmup=args.warmup,
        baseline=not args.no_baseline,
        as_json=args.json,
    )
    return 0


def cmd_generate(args) -> int:
    from finetune.generate import generate_cli

    generate_cli(args)
    return 0


def cmd_eval(args) -> int:
    import json

    from finetune.evaluate import evaluate, format_report

    result = evaluate(
        args.run, data=args.data, stride=args.stride, base=args.base, progress=not args.json
    )
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def cmd_merge(args) -> int:
    from finetune.lora import merge_run

    print(merge_run(args.run))
    return 0


def cmd_push(args) -> int:
    from finetune.hub import push

    push(
        args.run,
        args.repo_id,
        private=args.private,
        merged=args.merged,
        revision=args.revision,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
    )
    return 0
