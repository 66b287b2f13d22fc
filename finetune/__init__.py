"""finetune: recipe-driven fine-tuning of GPT-2, GPT-Neo and GPT-J on Hugging Face Transformers."""

__version__ = "0.1.0"
