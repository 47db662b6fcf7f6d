"""The seed's RULER-4096 / Qwen3-8B numbers, transcribed into ``results/seed/`` (one tidy CSV per table).

Every file has the same long layout, one printed number per row:

``press``, ``variant`` (``evict``, ``merge``, ``adakv``, ``no_press``), ``config`` (our registry name for
the series), ``params`` (merge parameters as JSON, as :class:`~mergepress.sweep.run.Config` writes them),
``compression_ratio`` (the seed's "0.88" is 0.875), ``threshold`` (DMS), ``cr_label`` (as printed),
``task`` (kvpress's RULER name, or ``average`` / ``all``), ``seed_label`` (the row label as printed),
``quantity`` (``score``, ``delta`` = merge - evict, ``lift_pct``, ``seconds``, ``infer_s``, ``wins``,
``losses``), ``value``, ``printed`` (the token as printed) and ``line`` (its line in the seed document).

>>> from mergepress.seed import load_seed_table, seed_scores
>>> seed_scores("knorm_tasks").query("task == 'average'")  # the seed's reported averages
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

SEED_DIR = Path(__file__).resolve().parent.parent / "results" / "seed"

#: Tables with one row per task (and the reported average row where the seed prints one).
TASK_TABLES = ("knorm_tasks", "expected_attention_tasks", "kvzap_tasks", "dms_tasks")
#: Tables of averages only.
AVERAGE_TABLES = ("knorm_average", "adakv_average", "expected_attention_average", "kvzap_average", "dms_summary")
#: Everything else: wall-clock rows, and the AdaKV win/loss counts quoted in the seed's prose.
OTHER_TABLES = ("kvzap_wallclock", "adakv_winloss")
TABLES = TASK_TABLES + AVERAGE_TABLES + OTHER_TABLES

#: The seed's short task labels and kvpress's RULER names.
SEED_TASK_LABELS = {
    "cwe": "cwe",
    "fwe": "fwe",
    "niah_mk1": "niah_multikey_1",
    "niah_mk2": "niah_multikey_2",
    "niah_mk3": "niah_multikey_3",
    "niah_mq": "niah_multiquery",
    "niah_mv": "niah_multivalue",
    "niah_s1": "niah_single_1",
    "niah_s2": "niah_single_2",
    "niah_s3": "niah_single_3",
    "qa_1": "qa_1",
    "qa_2": "qa_2",
    "vt": "vt",
}

#: Which seed tables each RULER notebook compares against.
NOTEBOOK_TABLES = {
    "knorm": ("knorm_tasks", "knorm_average"),
    "adakv": ("adakv_average", "adakv_winloss"),
    "expected_attention": ("expected_attention_tasks", "expected_attention_average"),
    "kvzap": ("kvzap_tasks", "kvzap_average", "kvzap_wallclock"),
    "dms": ("dms_tasks", "dms_summary"),
}


def load_seed_table(name: str, seed_dir: str | Path | None = None) -> pd.DataFrame:
    """One transcribed table, ``params`` as a string (``""`` when none) and numbers parsed."""
    if name not in TABLES:
        raise ValueError(f"unknown seed table {name!r}; the tables are: {', '.join(TABLES)}")
    path = Path(seed_dir or SEED_DIR) / f"{name}.csv"
    df = pd.read_csv(
        path,
        keep_default_na=False,
        na_values={"compression_ratio": [""], "threshold": [""]},
        dtype={"params": str, "printed": str, "cr_label": str, "seed_label": str},
    )
    return df


def seed_scores(name: str, seed_dir: str | Path | None = None) -> pd.DataFrame:
    """The ``score`` rows of a table, without the quantity columns' other entries."""
    df = load_seed_table(name, seed_dir)
    return df[df["quantity"] == "score"].reset_index(drop=True)


def decimals(printed: str) -> int:
    """Digits after the decimal point of a number as printed ("94.86" -> 2, "+0.0" -> 1, "5" -> 0)."""
    text = printed.strip().rstrip("%")
    return len(text.split(".")[1]) if "." in text else 0


def seed_average(
    name: str, tasks: list[str] | tuple[str, ...] | None = None, seed_dir: str | Path | None = None
) -> pd.DataFrame:
    """Per series and ratio (or threshold): the mean of the seed's per-task scores over ``tasks``.

    With ``tasks=None`` all tasks of the table (13 for the seed's RULER); pass the tasks of our own
    sweep (no ``qa_1`` / ``qa_2`` offline) to compare like with like.
    """
    df = seed_scores(name, seed_dir)
    df = df[df["task"] != "average"]
    if tasks is not None:
        df = df[df["task"].isin(list(tasks))]
    keys = ["press", "variant", "config", "params", "compression_ratio", "threshold"]
    out = df.groupby(keys, dropna=False).agg(score=("value", "mean"), n_tasks=("task", "nunique"))
    return out.reset_index()


def seed_win_loss(name: str, tasks: list[str] | tuple[str, ...] | None = None, seed_dir: str | Path | None = None):
    """Per merge series and ratio (or threshold): tasks whose printed delta is > 0, < 0 or 0.

    ``name`` is a per-task table; ``tasks`` restricts the count (e.g. to the tasks of our sweep).
    """
    df = load_seed_table(name, seed_dir)
    df = df[(df["quantity"] == "delta") & (df["task"] != "average")]
    if tasks is not None:
        df = df[df["task"].isin(list(tasks))]
    outcome = df["value"].gt(0).map({True: "wins"}).fillna(df["value"].lt(0).map({True: "losses"})).fillna("ties")
    keys = ["config", "params", "compression_ratio", "threshold"]
    counts = df.assign(outcome=outcome).groupby(keys, dropna=False)["outcome"].value_counts().unstack(fill_value=0)
    counts = counts.reindex(columns=["wins", "losses", "ties"], fill_value=0).rename_axis(columns=None)
    return counts.reset_index()
