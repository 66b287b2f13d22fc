"""finetune: recipe-driven fine-tuning of GPT-2, GPT-Neo and GPT-J on Hugging Face Transformers."""

__version__ = "0.1.0"


def load(path):
    """A run folder (full or LoRA) or model folder as a `finetune.api.LanguageModel`.

    complete / embed / similarity / classify / perplexity; see finetune/api.py. Imported lazily
    so that `import finetune` stays light (no torch).
    """
    from finetune.api import load as _load

    return _load(path)
