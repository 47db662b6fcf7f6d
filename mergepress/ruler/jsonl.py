"""Save and load a generated suite as JSONL, so a sweep reads exactly the data another run used.

Line 1 is a header record (``{"header": {...}}``: generator version, tokenizer, length, seed,
tasks, ...); every other line is one sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mergepress.ruler.generator import COLUMNS, GENERATOR_VERSION

_REQUIRED = ("generator_version", "tokenizer", "length", "seed", "tasks")


def save_jsonl(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` (made by ``generate``/``generate_suite``, with its ``attrs``) to ``path``."""
    missing = [k for k in _REQUIRED if k not in df.attrs]
    if missing:
        raise ValueError(
            f"the DataFrame lacks the generator metadata {missing} in df.attrs; "
            "save frames made by mergepress.ruler.generate or generate_suite"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"header": df.attrs}, ensure_ascii=False) + "\n")
        for row in df[COLUMNS].to_dict(orient="records"):
            row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}  # numpy -> Python
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_header(path: str | Path) -> dict:
    """The header record of a saved suite; ValueError when the file is not one."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        header = json.loads(first)["header"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path} is not a RULER suite saved by mergepress.ruler (no header)") from None
    if not isinstance(header, dict) or any(k not in header for k in _REQUIRED):
        raise ValueError(f"{path} has an incomplete header; expected the keys {list(_REQUIRED)}")
    return header


def load_jsonl(path: str | Path) -> pd.DataFrame:
    """Read a suite written by :func:`save_jsonl`; its header comes back as ``df.attrs``.

    Refuses (ValueError) a file written by another generator version, whose samples would
    differ from what this version generates for the same arguments.
    """
    path = Path(path)
    header = read_header(path)
    if header["generator_version"] != GENERATOR_VERSION:
        raise ValueError(
            f"{path} was written by RULER generator version {header['generator_version']!r}, but this "
            f"is version {GENERATOR_VERSION!r}; regenerate it (python -m mergepress.ruler ...) so that "
            "every run reads the same samples"
        )
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f.readlines()[1:] if line.strip()]
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs = header
    return df
