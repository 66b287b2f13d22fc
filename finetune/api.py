"""`finetune.load(RUN_OR_MODEL)`: a tuned model with the everyday capabilities of a completion API.

    import finetune
    lm = finetune.load("runs/offline-demo")
    lm.complete("The", max_new_tokens=20, seed=0)
    lm.embed(["first text", "second text"])        # one vector per text
    lm.similarity("a cat", "a kitten")            # cosine of the embeddings
    lm.classify("I loved it", ["positive", "negative"], examples=[("Awful.", "negative")])
    lm.perplexity("Some held-out text.")

Everything runs batched, without gradients, on the model's device. Padding is marked by the
attention mask, never by the pad id (which is end-of-text, a real token).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.generate import pad_batch, sample

MAX_BATCH = 16
TOKENS_PER_BATCH = 4096  # bounds the logits (tokens x vocabulary) of one forward pass


@dataclass
class Classification:
    """The chosen label and every label's score (log-likelihood of the label given the prompt)."""

    label: str
    scores: dict[str, float]


class LanguageModel:
    """A causal language model and its tokenizer; see the module docstring for an example."""

    def __init__(self, model, tokenizer, window: int | None = None, name: str = "model"):
        from finetune.model import context_length

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.context = context_length(model.config)
        self.window = min(window or self.context, self.context)

    def __repr__(self) -> str:
        return f"LanguageModel({self.name!r}, window={self.window}, device={self.device})"

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------------- completion

    def complete(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int = 50,
        top_p: float = 0.95,
        seed: int = 0,
    ) -> str | list[str]:
        """The continuation of `prompt` (a list of prompts gives a list); same seed, same text."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = sample(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        texts = [group[0] for group in texts]
        return texts[0] if isinstance(prompt, str) else texts

    # ----------------------------------------------------------------------- embeddings

    def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """One vector per text: the last hidden state averaged over the text's real tokens."""
        import torch

        encoded = self._encode_all([texts] if isinstance(texts, str) else list(texts), "embed")
        vectors = []
        with torch.no_grad():
            for batch in _batches([ids[-self.window :] for ids in encoded]):
                ids, mask = pad_batch(batch, self.tokenizer.pad_token_id)
                ids, mask = ids.to(self.device), mask.to(self.device)
                out = self.model(
                    input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
                )
                hidden = out.hidden_states[-1].float()
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1)
                vectors.extend(pooled.cpu().tolist())
        return vectors

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the two texts' embeddings, in [-1, 1]."""
        u, v = self.embed([a, b])
        dot = sum(x * y for x, y in zip(u, v, strict=True))
        norm = math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v))
        return dot / norm if norm else 0.0

    # ----------------------------------------------------------------------- likelihoods

    def log_likelihood(self, context: str, continuations: Sequence[str]) -> list[float]:
        """log p(continuation | context) in nats for each continuation, in one batch.

        Context and continuation are tokenized separately and joined, so the continuation's
        tokens are exactly its own; an empty context is replaced by end-of-text.
        """
        import torch

        context_ids = self._encode(context) or [self.tokenizer.eos_token_id]
        rows, lengths = [], []
        for number, text in enumerate(continuations, start=1):
            cont = self._encode(text)
            if not cont:
                raise FinetuneError(f"continuation {number} is empty; give it some text")
            if len(cont) >= self.window:
                raise FinetuneError(f"continuation {number} is longer than the model's window")
            rows.append((context_ids + cont)[-self.window :])
            lengths.append(len(cont))
        scores = []
        with torch.no_grad():
            for batch in _batches(list(zip(rows, lengths, strict=True)), key=lambda r: r[0]):
                ids, mask = pad_batch([seq for seq, _ in batch], self.tokenizer.pad_token_id)
                ids, mask = ids.to(self.device), mask.to(self.device)
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                for row, (seq, n) in enumerate(batch):
                    end = len(seq)  # right padding: the real tokens are seq's first `end`
                    targets = ids[row, end - n : end]
                    logprobs = torch.log_softmax(logits[row, end - n - 1 : end - 1].float(), -1)
                    scores.append(float(logprobs.gather(-1, targets[:, None]).sum()))
        return scores

    def classify(
        self,
        text: str,
        labels: Sequence[str],
        examples: Iterable[tuple[str, str]] | None = None,
        per_token: bool = False,
    ) -> Classification:
        """The label with the highest log-likelihood after a (few-shot) prompt, as in GPT-3.

        The prompt is each example as "Text: ...\\nLabel: ...", then the text with an open
        "Label:". `per_token` divides each score by the label's token count (the GPT-3 paper's
        length normalisation), which keeps long labels from being penalised.
        """
        labels = list(labels)
        if not labels or any(not str(label).strip() for label in labels):
            raise FinetuneError("classify needs a list of non-empty labels")
        if len(set(labels)) != len(labels):
            raise FinetuneError("classify: the labels must be distinct")
        if not text.strip():
            raise FinetuneError("classify: the text is empty")
        shots = "".join(f"Text: {x}\nLabel: {y}\n\n" for x, y in (examples or []))
        prompt = f"{shots}Text: {text}\nLabel:"
        scores = self.log_likelihood(prompt, [f" {label}" for label in labels])
        if per_token:
            scores = [
                s / len(self._encode(f" {label}")) for s, label in zip(scores, labels, strict=True)
            ]
        by_label = dict(zip(labels, scores, strict=True))
        return Classification(max(by_label, key=by_label.get), by_label)

    def perplexity(self, text: str | Sequence[str]) -> float | list[float]:
        """Token-weighted perplexity of a text (sliding windows of the model's window)."""
        from finetune.evaluate import score_tokens

        texts = [text] if isinstance(text, str) else list(text)
        values = []
        for ids in self._encode_all(texts, "perplexity"):
            if len(ids) < 2:
                raise FinetuneError("perplexity needs a text of at least 2 tokens")
            values.append(score_tokens(self.model, ids, self.window).perplexity)
        return values[0] if isinstance(text, str) else values

    # ----------------------------------------------------------------------- helpers

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_all(self, texts: list[str], what: str) -> list[list[int]]:
        if not texts:
            raise FinetuneError(f"{what} needs at least one text")
        encoded = [self._encode(t) for t in texts]
        for number, ids in enumerate(encoded, start=1):
            if not ids:
                raise FinetuneError(f"{what}: text {number} is empty")
        return encoded


def _batches(items: list, key=lambda item: item):
    """Consecutive batches of at most MAX_BATCH items and about TOKENS_PER_BATCH padded tokens."""
    batch, longest = [], 0
    for item in items:
        length = len(key(item))
        full = len(batch) == MAX_BATCH or max(longest, length) * (len(batch) + 1) > TOKENS_PER_BATCH
        if batch and full:
            yield batch
            batch, longest = [], 0
        batch.append(item)
        longest = max(longest, length)
    if batch:
        yield batch


def load(path: str | Path) -> LanguageModel:
    """A run folder (full or LoRA, unmerged) or a local model folder, ready to use."""
    from finetune.evaluate import run_recipe
    from finetune.generate import load_for_inference

    model, tokenizer = load_for_inference(path)
    recipe = run_recipe(Path(path))
    window = recipe.data.block_size if recipe else None
    return LanguageModel(model, tokenizer, window, name=str(path))


def load_base(path: str | Path) -> LanguageModel:
    """The model a run started from, with the run's tokenizer (FinetuneError if unreachable)."""
    from transformers import AutoTokenizer

    from finetune.evaluate import base_description, run_recipe
    from finetune.evaluate import load_base as load_base_model
    from finetune.model import finish_tokenizer

    run = Path(path)
    recipe = run_recipe(run)
    if recipe is None:
        raise FinetuneError(f"{path} has no recipe.yaml, so it names no base model")
    tokenizer = finish_tokenizer(AutoTokenizer.from_pretrained(str(run)))
    model = load_base_model(run, recipe, tokenizer)
    return LanguageModel(
        model, tokenizer, recipe.data.block_size, name=base_description(run, recipe)
    )
