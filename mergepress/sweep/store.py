"""An append-only results CSV that survives being killed at any moment.

Each row is written as one line (newlines in answers are escaped as ``\\n``) and flushed to disk
before the next one starts, so a killed run leaves at most one partial last line, which the next
open cuts off. The generation settings live in a JSON sidecar; opening the file with other
settings is refused, so rows from different experiments never mix.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pandas as pd

COLUMNS = [
    "task",
    "index",
    "config",
    "value",
    "params",
    "status",
    "compression_ratio",
    "predicted_answer",
    "score",
    "answer_nll",
    "context_tokens",
    "prefill_s",
    "press_s",
    "decode_s",
]
KEY = ("task", "index", "config", "value", "params")


def row_key(row: dict) -> tuple:
    """Identity of a (sample, configuration) pair; ``value`` compared as float."""
    return (str(row["task"]), int(row["index"]), str(row["config"]), float(row["value"]), str(row["params"] or ""))


def settings_path(path: Path) -> Path:
    return path.with_name(path.stem + ".settings.json")


class ResultStore:
    """Rows of one sweep in ``path`` (CSV), guarded by the settings in its sidecar."""

    def __init__(self, path: str | Path, settings: dict, write_settings: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_settings(self.path, settings, write=write_settings)
        self._repair()
        self.done = {row_key(r) for r in read_rows(self.path)}

    def _repair(self) -> None:
        """Cut a partial last line left by a killed run; write the header into a new file."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.write_text(",".join(COLUMNS) + "\n")
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, row: dict) -> None:
        """Write one row and make it durable before returning."""
        clean = {c: row.get(c, "") for c in COLUMNS}
        clean["predicted_answer"] = str(clean["predicted_answer"]).replace("\r", "\\r").replace("\n", "\\n")
        buffer = io.StringIO()
        csv.DictWriter(buffer, COLUMNS, lineterminator="\n").writerow(clean)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        self.done.add(row_key(clean))


def check_settings(path: Path, settings: dict, write: bool = True) -> None:
    """Refuse ``path`` if its sidecar holds other settings; otherwise record them (atomically)."""
    sidecar = settings_path(path)
    if sidecar.exists():
        stored = json.loads(sidecar.read_text())
        if stored != settings:
            diff = {
                k: (stored.get(k), settings.get(k))
                for k in set(stored) | set(settings)
                if stored.get(k) != settings.get(k)
            }
            raise ValueError(
                f"{path} holds results generated with other settings (stored vs now: {diff}); "
                "write to another file or delete it and its .settings.json"
            )
    elif write:
        tmp = sidecar.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, sidecar)


def read_rows(path: str | Path) -> list[dict]:
    """Complete rows of a results CSV (a partial last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def read_results(path: str | Path) -> pd.DataFrame:
    """A results CSV as a DataFrame with numeric columns parsed."""
    return pd.read_csv(
        path, keep_default_na=False, na_values=["", "nan"], dtype={"params": str, "predicted_answer": str}
    )


def merge_parts(path: Path, parts: list[Path], order: list[tuple]) -> None:
    """Fold per-process part files into ``path``: deduplicated, in ``order`` of keys, atomically."""
    rows = {row_key(r): r for p in [path, *parts] for r in read_rows(p)}
    rank = {key: i for i, key in enumerate(order)}
    ordered = sorted(rows.values(), key=lambda r: rank.get(row_key(r), len(rank)))
    tmp = path.with_suffix(".merging")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(ordered)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for p in parts:
        p.unlink()
