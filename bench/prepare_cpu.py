"""CPU benchmark: `finetune prepare` against a run_clm-style `datasets.map` pipeline.

    .venv/bin/python bench/prepare_cpu.py [--copies 10] [--repeat 3] [--out FILE.json]

The corpus is ../shared/data/tinyshakespeare.txt concatenated `--copies` times into a temporary
file (11 MB for 10; never copied into the repository). The tokenizer, shared by both sides, is a
GPT-2-style byte-level BPE trained once on tinyshakespeare (untimed) and saved to a temporary
folder. Each repetition, in alternating order, runs in fresh subprocesses with empty caches:

- finetune, first run: `finetune prepare RECIPE` (tokenizes, writes the cache);
- finetune, second run: the same command again (the corpus is unchanged: the cached path);
- reference: run_clm's preprocessing: `load_dataset("text", keep_linebreaks=True)`, then
  `map(tokenize, batched=True, num_proc=2)` and `map(group_texts, batched=True, num_proc=2)`,
  with the same tokenizer loaded by `AutoTokenizer` (one split only: run_clm would also slice a
  validation split, more work for the reference);
- `python -c "import finetune"`, the floor the second run is measured against.

Times are wall clock of the whole command (interpreter start and imports included); the
reference also reports its time after imports. Medians over the repetitions are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
BLOCK_SIZE = 1024

REFERENCE = r"""
import sys, time
from itertools import chain
import datasets
from transformers import AutoTokenizer
corpus, tokenizer_dir, block_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
raw = datasets.load_dataset("text", data_files={"train": corpus}, keep_linebreaks=True)

def tokenize_function(examples):
    return tokenizer(examples["text"])

tokenized = raw.map(tokenize_function, batched=True, num_proc=2, remove_columns=["text"])

def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
              for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result

lm_datasets = tokenized.map(group_texts, batched=True, num_proc=2)
tokens = sum(len(ids) for ids in tokenized["train"]["input_ids"])
print(f"REFERENCE seconds_after_imports={time.perf_counter() - start:.3f} tokens={tokens} "
      f"blocks={len(lm_datasets['train'])}")
"""


def run(command: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    if not SHAKESPEARE.is_file():
        sys.exit(f"{SHAKESPEARE} is missing (the shared reference corpora)")

    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        text = SHAKESPEARE.read_text(encoding="utf-8")
        corpus.write_text(text * args.copies, encoding="utf-8")
        tokenizer_dir = tmp / "tokenizer"
        sys.path.insert(0, str(ROOT))
        from finetune.model import train_tokenizer

        train_tokenizer([text], 50257).save_pretrained(tokenizer_dir)
        recipe = tmp / "recipe.yaml"
        recipe.write_text(
            "model: {architecture: gpt2, config: {n_layer: 2, n_embd: 64, n_head: 2}}\n"
            f"tokenizer: {{name: {tokenizer_dir}}}\n"
            f"data: {{train: {corpus}, validation_split: 0.1, block_size: {BLOCK_SIZE}}}\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
        figures: dict[str, list] = {
            "first": [],
            "second": [],
            "reference": [],
            "reference_after_imports": [],
            "import_finetune": [],
        }
        for i in range(args.repeat):
            cache = tmp / f"cache-{i}"
            ours = [PYTHON, "-m", "finetune", "prepare", str(recipe), f"data.cache_dir={cache}"]
            reference = [PYTHON, "-c", REFERENCE, str(corpus), str(tokenizer_dir), str(BLOCK_SIZE)]
            ref_env = {**env, "HF_DATASETS_CACHE": str(tmp / f"hf-{i}")}
            order = ["ours", "reference"] if i % 2 == 0 else ["reference", "ours"]
            for side in order:
                if side == "ours":
                    seconds, out = run(ours, env)
                    figures["first"].append(seconds)
                    assert "data (tokenized)" in out, out
                    ours_out = out
                    seconds, out = run(ours, env)
                    assert "data (cached)" in out, out
                    figures["second"].append(seconds)
                else:
                    seconds, out = run(reference, ref_env)
                    figures["reference"].append(seconds)
                    line = next(x for x in out.splitlines() if x.startswith("REFERENCE"))
                    fields = dict(kv.split("=") for kv in line.split()[1:])
                    figures["reference_after_imports"].append(
                        float(fields["seconds_after_imports"])
                    )
            seconds, _ = run([PYTHON, "-c", "import finetune"], env)
            figures["import_finetune"].append(seconds)
            print(
                f"repetition {i + 1}: "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in figures.items()),
                flush=True,
            )

    median = {k: statistics.median(v) for k, v in figures.items()}
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {sys.platform}",
        "corpus_bytes": len(text.encode()) * args.copies,
        "repeat": args.repeat,
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in figures.items()},
        "first_run_speedup": round(median["reference"] / median["first"], 2),
        "second_run_beyond_import_s": round(median["second"] - median["import_finetune"], 3),
        "finetune_output": ours_out.strip().splitlines(),
        "reference_tokens": int(fields["tokens"]),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
