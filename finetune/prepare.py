"""`finetune prepare`: tokenize and cache a recipe's data, and nothing else.

The way to prepare data once before a multi-node run (point `data.cache_dir` at shared storage),
or to check what a corpus gives before training on it. It reads the model, tokenizer and data
blocks; `training:` is not checked here (only its seed is read), `finetune check` does that.

The tokenized cache is keyed by content (the tokenizer and the corpus bytes, see finetune.data),
which needs the tokenizer loaded and the corpus hashed. A second run skips both: an index entry
keyed by the corpus files' identity (inode, size, mtime and ctime, as git's index does) and the
settings points at the cache entry, and records the tokenizer files it was made with. When any
of them changed, the run falls back to the content-keyed path. The cached path imports neither
torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from finetune import corpus
from finetune.config import Recipe, load_recipe
from finetune.errors import FinetuneError

# `transformers.TrainingArguments`' default seed (checked by tests/test_prepare.py); reading it
# from there would import transformers on the cached path.
DEFAULT_SEED = 42
INDEX_VERSION = "1"


def prepare_command(path: str, overrides: list[str], echo=print) -> dict:
    """Prepare (or find) the recipe's tokenized data; print its figures and cache path."""
    start = time.perf_counter()
    recipe = load_recipe(path, overrides, check_training=False)
    seed = training_seed(recipe)
    key = index_key(recipe, seed)
    record = read_index(recipe, key) if key else None
    from_index = record is not None
    if record is None:
        record, from_cache = prepare_fully(recipe, seed)
        if key:
            write_index(recipe, key, record)
    from_cache = from_index or from_cache
    block = recipe.data.block_size
    echo(summary(record["stats"], block, "cached" if from_cache else "tokenized"))
    if any(record["stats"][name]["tokens"] < block for name in ("train", "validation")):
        echo(
            f"warning: a split holds less than one block of {block} tokens; "
            "`finetune train` will refuse it"
        )
    echo(f"cache: {record['entry']}")
    seconds = time.perf_counter() - start
    echo(f"prepared in {seconds:.2f} s")
    return {
        "cache_path": record["entry"],
        "from_cache": from_cache,
        "from_index": from_index,
        "stats": record["stats"],
        "seconds": seconds,
    }


def training_seed(recipe: Recipe) -> int:
    seed = recipe.training.get("seed", DEFAULT_SEED)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FinetuneError(f"training.seed: expected an integer, got {seed!r}")
    return seed


def prepare_fully(recipe: Recipe, seed: int) -> tuple[dict, bool]:
    """Load the tokenizer, then tokenize or reuse the content-keyed cache (the bool says which)."""
    from finetune import data as data_lib
    from finetune.model import build_tokenizer

    tokenizer = build_tokenizer(recipe)
    prepared = data_lib.prepare(recipe.data, tokenizer, seed)
    stats = {
        name: {
            "documents": split.documents,
            "characters": split.characters,
            "tokens": int(len(split.tokens)),
        }
        for name, split in (("train", prepared.train), ("validation", prepared.validation))
    }
    record = {
        "entry": str(prepared.cache_path),
        "stats": stats,
        "tokenizer_files": tokenizer_files(tokenizer.name_or_path, recipe),
    }
    return record, prepared.from_cache


def summary(stats: dict, block_size: int, source: str) -> str:
    t, v = stats["train"], stats["validation"]
    return (
        f"data ({source}): train {t['documents']} documents, {t['tokens']:,} tokens, "
        f"{t['tokens'] // block_size} blocks of {block_size}; validation {v['documents']} "
        f"documents, {v['tokens']:,} tokens, {v['tokens'] // block_size} blocks"
    )


# --------------------------------------------------------------------------- the index


def index_key(recipe: Recipe, seed: int) -> str | None:
    """A key from the settings and the corpus files' identity; None for hub datasets."""
    from finetune.data import CACHE_VERSION

    data = recipe.data
    sources = []
    for spec, setting in ((data.train, "data.train"), (data.validation, "data.validation")):
        if spec is None:
            continue
        source = corpus.resolve(spec, setting)
        if source.is_hub:
            return None  # a hub dataset has no files to compare
        sources.append([spec, [[str(p.resolve()), *file_identity(p)] for p in source.files]])
    material = {
        "index": INDEX_VERSION,
        "cache": CACHE_VERSION,
        "sources": sources,
        "validation_split": None if data.validation else data.validation_split,
        "seed": None if data.validation else seed,
        "text_column": data.text_column,
        "encoding": data.encoding,
        "tokenizer": dataclasses.asdict(recipe.tokenizer),
        "model": [recipe.model.name, recipe.model.revision],
        "cwd": os.getcwd(),  # relative tokenizer and model names resolve from here
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def file_identity(path: Path) -> list[int]:
    """What changes when a file's content may have: ctime moves on every write and rename."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def tokenizer_files(name_or_path: str, recipe: Recipe) -> dict[str, list[int]]:
    """The files a tokenizer was loaded from, with their identity ({} when unknown)."""
    folder = Path(name_or_path)
    extra = []
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        revision = recipe.model.revision if recipe.tokenizer.name is None else None
        found = try_to_load_from_cache(name_or_path, "tokenizer_config.json", revision=revision)
        if not isinstance(found, str):
            return {}
        folder = Path(found).parent  # .../snapshots/<commit>
        ref = folder.parent.parent / "refs" / (revision or "main")
        extra = [ref] if ref.is_file() else []  # moves when the hub cache is updated
    files = [p for p in sorted(folder.iterdir()) if p.is_file()] + extra
    return {str(p.resolve()): file_identity(p) for p in files}


def _index_dir(recipe: Recipe) -> Path:
    from finetune.data import cache_root

    return cache_root(recipe.data) / "tokenized" / "index"


def read_index(recipe: Recipe, key: str) -> dict | None:
    """The recorded entry, if it and the tokenizer files it was made with are unchanged."""
    try:
        record = json.loads((_index_dir(recipe) / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    if not record.get("tokenizer_files") or not (Path(record["entry"]) / "meta.json").is_file():
        return None
    for name, identity in record["tokenizer_files"].items():
        try:
            if file_identity(Path(name)) != identity:
                return None
        except OSError:
            return None
    return record


def write_index(recipe: Recipe, key: str, record: dict) -> None:
    if not record["tokenizer_files"]:
        return  # nothing to check a later run against: let it take the content-keyed path
    folder = _index_dir(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / f"{key}.json")
