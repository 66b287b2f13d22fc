"""Reading corpora into documents: text files, folders, globs, JSONL/JSON/CSV/Parquet, hub datasets.

Each text file is one document; each JSONL/CSV/Parquet row is one document. Every problem with the
input is a FinetuneError that names the file (and line or byte offset) and says what to do.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUB_PREFIX = "hf:"


@dataclass
class Source:
    """One corpus setting (`data.train` or `data.validation`) resolved to what it reads."""

    spec: str
    key: str  # "data.train" or "data.validation", for error messages
    files: list[Path]

    @property
    def is_hub(self) -> bool:
        return self.spec.startswith(HUB_PREFIX)

    def fingerprint(self) -> str:
        """A content hash: the cache is reused exactly when the bytes are unchanged."""
        digest = hashlib.sha256(self.spec.encode())
        for path in self.files:
            digest.update(str(path.name).encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()


def resolve(spec: str, key: str) -> Source:
    """Find the files a corpus setting names, or raise naming the setting and the fix."""
    if spec.startswith(HUB_PREFIX):
        return Source(spec, key, [])
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise FinetuneError(f"{key}: the pattern {spec} matches no file")
        return Source(spec, key, files)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FinetuneError(f"{key}: the folder {spec} holds no .txt or .md file")
        return Source(spec, key, files)
    if not path.is_file():
        # `make data` fetches only the Elon Musk transcripts the shipped recipes train on.
        fix = "run `make data`" if path.name == "elon-musk.txt" else "check the path"
        raise FinetuneError(f"{key}: file not found: {spec} ({fix})")
    if path.suffix.lower() not in TEXT_SUFFIXES + TABLE_SUFFIXES:
        raise FinetuneError(
            f"{key}: unsupported file type {path.suffix or '(none)'} for {spec}; use .txt, .md, "
            ".jsonl, .json, .csv or .parquet"
        )
    return Source(spec, key, [path])


def read_documents(source: Source, text_column: str, encoding: str) -> list[str]:
    """All documents of a source, in a stable order; empty documents are dropped."""
    if source.is_hub:
        docs = _read_hub(source, text_column)
    else:
        docs = []
        for path in source.files:
            suffix = path.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                docs.append(_decode(path, encoding, source.key))
            elif suffix == ".parquet":
                docs.extend(_read_parquet(path, text_column, source.key))
            else:
                text = _decode(path, encoding, source.key)
                reader = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_json}[suffix]
                docs.extend(reader(text, path, text_column, source.key))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise FinetuneError(f"{source.key}: {source.spec} holds no text (empty or whitespace only)")
    return docs


def _decode(path: Path, encoding: str, key: str) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise FinetuneError(f"{key}: {path} is empty (or whitespace only); give it some text")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise FinetuneError(
            f"{key}: {path} looks binary (NUL byte at byte offset {nul}); point it at a text file"
        )
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise FinetuneError(
            f"{key}: {path} is not valid {encoding} at byte offset {exc.start}; "
            "set data.encoding (for example data.encoding=latin-1)"
        ) from None
    except LookupError:
        raise FinetuneError(f"data.encoding: unknown encoding {encoding!r} (try utf-8)") from None


def _text_of(row: object, text_column: str, where: str, key: str) -> str:
    if not isinstance(row, dict):
        raise FinetuneError(f"{key}: {where} is not an object with a {text_column!r} field")
    if text_column not in row:
        present = ", ".join(map(str, row)) or "none"
        raise FinetuneError(
            f"{key}: {where} has no column {text_column!r} (columns present: {present}); "
            "set data.text_column"
        )
    value = row[text_column]
    return "" if value is None else str(value)


def _read_jsonl(text: str, path: Path, text_column: str, key: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FinetuneError(
                f"{key}: {path} line {number} is not valid JSON ({exc.msg}); fix or remove it"
            ) from None
        docs.append(_text_of(row, text_column, f"{path} line {number}", key))
    return docs


def _read_json(text: str, path: Path, text_column: str, key: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(text, path, text_column, key)  # JSON Lines saved as .json
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise FinetuneError(f"{key}: {path} must hold a list of objects or JSON Lines")
    return [_text_of(row, text_column, f"{path} item {i}", key) for i, row in enumerate(data)]


def _read_csv(text: str, path: Path, text_column: str, key: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or text_column not in reader.fieldnames:
        present = ", ".join(reader.fieldnames or []) or "none"
        raise FinetuneError(
            f"{key}: {path} has no column {text_column!r} (columns present: {present}); "
            "set data.text_column"
        )
    return [row[text_column] or "" for row in reader]


def _read_parquet(path: Path, text_column: str, key: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise FinetuneError(f"{key}: {path} is not a readable Parquet file ({exc})") from None
    if text_column not in table.column_names:
        raise FinetuneError(
            f"{key}: {path} has no column {text_column!r} (columns present: "
            f"{', '.join(table.column_names)}); set data.text_column"
        )
    return [v or "" for v in table.column(text_column).to_pylist()]


def _read_hub(source: Source, text_column: str) -> list[str]:
    from finetune.net import require_hub

    name, _, config = source.spec[len(HUB_PREFIX) :].partition(":")
    require_hub(f"the dataset {name}", source.key)
    import datasets

    try:
        dataset = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # the hub client raises many types; all mean "cannot load it"
        raise FinetuneError(f"{source.key}: cannot load hub dataset {name!r}: {exc}") from None
    if text_column not in dataset.column_names:
        raise FinetuneError(
            f"{source.key}: {name} has no column {text_column!r} (columns present: "
            f"{', '.join(dataset.column_names)}); set data.text_column"
        )
    return [v or "" for v in dataset[text_column]]
