"""`finetune eval`: token-weighted perplexity of a run (full or LoRA) or model folder.

Perplexity is exp(total negative log-likelihood / number of predicted tokens), computed with the
sliding window of the transformers perplexity guide: windows of `window` tokens moved by `stride`;
each window predicts only the tokens the previous ones did not, using the rest as context. With
stride = window (the default), windows do not overlap and, on the run's own validation blocks, this
is exactly what the Trainer measured at the end of training (metrics.json).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.errors import FinetuneError

TOKENS_PER_BATCH = 4096  # bounds the logits tensor (tokens x vocabulary) of one forward pass


@dataclass
class Score:
    """Summed negative log-likelihood (nats) over the predicted tokens."""

    nll: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window: tokens [begin, end) are fed, those from begin+first scored.

    Every token but the very first is scored exactly once when stride < window; with
    stride = window each window's first token has no context and is not scored (as in training).
    """
    out, scored_until = [], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        first = max(1, scored_until - begin)
        if end - begin > first:
            out.append((begin, end, first))
        scored_until = end
        if end == length:
            break
    return out


def score_tokens(
    model, tokens, window: int, stride: int | None = None, progress: bool = False
) -> Score:
    """Sliding-window negative log-likelihood of a token sequence under a causal LM."""
    import torch
    from tqdm.auto import tqdm

    stride = stride or window
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < 2:
        raise FinetuneError("the text is too short: perplexity needs at least 2 tokens")
    spans = windows(len(tokens), window, stride)
    by_length: dict[int, list] = {}
    for span in spans:
        by_length.setdefault(span[1] - span[0], []).append(span)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with (
        tqdm(
            total=len(spans), desc="evaluating", unit="window", disable=not progress, leave=False
        ) as bar,
        torch.no_grad(),
    ):
        for length, group in by_length.items():
            per_batch = max(1, TOKENS_PER_BATCH // length)
            for start in range(0, len(group), per_batch):
                batch = group[start : start + per_batch]
                ids = torch.from_numpy(np.stack([tokens[b:e] for b, e, _ in batch])).to(device)
                mask = torch.ones_like(ids)  # no padding: every window is full of real tokens
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logits = logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
                ).view(len(batch), length - 1)
                # position j predicts token j + 1; score tokens from each window's `first` on
                firsts = torch.tensor([f for _, _, f in batch], device=device)
                keep = torch.arange(length - 1, device=device)[None, :] >= (firsts[:, None] - 1)
                total += float(nll[keep].double().sum())
                count += int(keep.sum())
                bar.update(len(batch))
    return Score(total, count)


def score_dataset(model, dataset, progress: bool = False) -> Score:
    """Negative log-likelihood over a dataset of equal-sized {input_ids, labels[, position_ids]}
    blocks, as the Trainer's evaluation computes it: labels of -100 are not scored."""
    import torch
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise FinetuneError("the validation data holds no full block to evaluate")
    per_batch = max(1, TOKENS_PER_BATCH // len(dataset[0]["input_ids"]))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with (
        tqdm(
            total=len(dataset), desc="evaluating", unit="block", disable=not progress, leave=False
        ) as bar,
        torch.no_grad(),
    ):
        for start in range(0, len(dataset), per_batch):
            items = [dataset[i] for i in range(start, min(start + per_batch, len(dataset)))]
            batch = {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}
            labels = batch.pop("labels")[:, 1:]
            if "position_ids" not in batch:  # packed documents are told apart by positions alone
                batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            keep = labels != -100
            total += float(
                torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
            )
            count += int(keep.sum())
            bar.update(len(items))
    return Score(total, count)


# --------------------------------------------------------------------------- runs


def run_recipe(run: Path):
    """The resolved recipe a run folder was trained from, or None for a plain model folder."""
    from finetune.config import load_recipe

    path = Path(run) / "recipe.yaml"
    return load_recipe(path) if path.is_file() else None


def training_seed(recipe) -> int:
    from transformers import TrainingArguments

    default = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}["seed"]
    return int(recipe.training.get("seed", default))


def validation_split(run: Path, recipe, tokenizer):
    """The run's tokenized validation split, rebuilt as the run built it (from the cache).

    Relative data paths in recipe.yaml are relative to the folder the run was trained in; when
    they do not resolve from here, that folder is worked out from the run's path and its
    relative training.output_dir, and the data is read from there.
    """
    from finetune import data as data_lib

    def prepare():
        return data_lib.prepare(recipe.data, tokenizer, training_seed(recipe), progress=False)

    try:
        return prepare().validation
    except FinetuneError as exc:
        folder = training_folder(run, recipe)
        if folder is not None and folder != Path.cwd():
            previous = os.getcwd()
            os.chdir(folder)  # keeps the recipe's paths as written, so the cache still matches
            try:
                return prepare().validation
            except FinetuneError:
                pass
            finally:
                os.chdir(previous)
        raise FinetuneError(
            f"cannot rebuild the validation data of {run} ({exc}); run from the folder it was "
            "trained in, or pass --data PATH"
        ) from None


def training_folder(run: Path, recipe) -> Path | None:
    """The working folder of the training, when training.output_dir was relative to it."""
    out = Path(os.path.normpath(recipe.training["output_dir"]))
    if out.is_absolute() or ".." in out.parts:
        return None
    here = Path(run).resolve()
    if here.parts[-len(out.parts) :] != out.parts:
        return None
    return Path(*here.parts[: -len(out.parts)])


def validation_tokens(run: Path, recipe, tokenizer) -> np.ndarray:
    """The run's validation blocks, flattened."""
    split = validation_split(run, recipe, tokenizer)
    return np.asarray(split.blocks(recipe.data.block_size)).reshape(-1)


def text_tokens(spec: str, tokenizer, recipe=None) -> np.ndarray:
    """A corpus (same forms as data.train) as one token stream, documents ended by end-of-text."""
    from finetune import corpus
    from finetune import data as data_lib

    column = recipe.data.text_column if recipe else "text"
    encoding = recipe.data.encoding if recipe else "utf-8"
    docs = corpus.read_documents(corpus.resolve(spec, "--data"), column, encoding)
    return np.concatenate(data_lib.tokenize_documents(tokenizer, docs, progress=False))


def _stride_too_large(stride: int, window: int):
    raise FinetuneError(
        f"--stride {stride} is larger than the window of {window} tokens; use --stride {window} "
        "or less"
    )


def window_of(recipe, model) -> int:
    """The run's block size (what the model was trained on), else the model's context."""
    from finetune.model import context_length

    context = context_length(model.config)
    return min(recipe.data.block_size, context) if recipe else context


def base_description(run: Path, recipe) -> str:
    if (run / "base" / "config.json").is_file():
        return f"{run / 'base'} (the LoRA run's saved base)"
    if recipe.model.architecture:
        return f"random-init {recipe.model.architecture} (seed {training_seed(recipe)})"
    return recipe.model.name


def load_base(run: Path, recipe, tokenizer):
    """The model the run started from, in eval mode on the best device.

    A LoRA run's saved base; else the recipe's pretrained model; else the random init rebuilt
    from model.architecture/config with the training seed (exactly the run's starting weights).
    Raises FinetuneError when that model must come from an unreachable hub.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import model as model_lib

    run = Path(run)
    if (run / model_lib.BASE_SUBDIR / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(run / model_lib.BASE_SUBDIR))
    else:
        if getattr(recipe.model, "quantization", None):  # judge the base in full precision
            spec = dataclasses.replace(recipe.model, quantization=None)
            recipe = dataclasses.replace(recipe, model=spec)
        config = model_lib.resolve_config(recipe.model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(training_seed(recipe))  # train() seeds right before building it
            model = model_lib.load_model(recipe, config, tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.float().to(device).eval()


def evaluate(
    path: str | Path,
    data: str | None = None,
    stride: int | None = None,
    base: bool = False,
    progress: bool = False,
) -> dict:
    """Perplexity of a run or model folder (and, with `base`, of the model it started from)."""
    from finetune.generate import load_for_inference

    run = Path(path)
    if not run.is_dir():
        raise FinetuneError(f"run folder not found: {path} (give a run folder or a model folder)")
    recipe = run_recipe(run)
    if recipe is None and base:
        raise FinetuneError(f"{path} has no recipe.yaml, so it names no base model for --base")
    if recipe is None and data is None:
        raise FinetuneError(f"{path} has no recipe.yaml, so it has no validation data: pass --data")
    if data is not None:
        from finetune import corpus

        if not data:
            raise FinetuneError("--data is empty; name a text file, folder or glob")
        corpus.resolve(data, "--data")  # a wrong path fails before the model loads
    if stride is not None and stride < 1:
        raise FinetuneError(f"--stride must be a positive number of tokens, got {stride}")
    if stride is not None and recipe is not None and stride > recipe.data.block_size:
        _stride_too_large(stride, recipe.data.block_size)  # before the weights load
    if base:
        from finetune.model import resolve_config

        resolve_config(recipe.model)  # fail now, not after evaluating, when the hub is needed
    model, tokenizer = load_for_inference(run)
    window = window_of(recipe, model)
    stride = stride or window
    if stride > window:
        _stride_too_large(stride, window)
    if data is None and stride == window:  # the very blocks (and packing) the run evaluated on
        from finetune.packing import block_dataset

        blocks = block_dataset(validation_split(run, recipe, tokenizer), recipe.data)
        source = "the run's validation blocks"

        def scorer(m):
            return score_dataset(m, blocks, progress)
    else:
        if data is None:
            tokens, source = (
                validation_tokens(run, recipe, tokenizer),
                "the run's validation blocks",
            )
        else:
            tokens, source = text_tokens(data, tokenizer, recipe), data

        def scorer(m):
            return score_tokens(m, tokens, window, stride, progress)

    score = scorer(model)
    result = {
        "model": str(run),
        "data": source,
        "window": window,
        "stride": stride,
        "tokens": score.tokens,
        "eval_loss": score.loss,
        "perplexity": score.perplexity,
    }
    if base:
        del model
        base_score = scorer(load_base(run, recipe, tokenizer))
        result.update(
            base_model=base_description(run, recipe),
            base_eval_loss=base_score.loss,
            base_perplexity=base_score.perplexity,
        )
    return result


def format_report(result: dict) -> str:
    lines = [
        f"data: {result['data']} ({result['tokens']:,} tokens scored; window {result['window']}, "
        f"stride {result['stride']})",
        f"{'model':<8} {'perplexity':>12} {'eval_loss':>10}",
        f"{'tuned':<8} {result['perplexity']:>12.3f} {result['eval_loss']:>10.4f}  "
        f"{result['model']}",
    ]
    if "base_perplexity" in result:
        lines.append(
            f"{'base':<8} {result['base_perplexity']:>12.3f} "
            f"{result['base_eval_loss']:>10.4f}  {result['base_model']}"
        )
    return "\n".join(lines)
