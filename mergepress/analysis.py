"""Paired comparisons of sweep results: merge against evict on the same samples, with bootstrap intervals.

A sweep CSV (:mod:`mergepress.sweep.store`) has one row per (sample, configuration). A *series* is a
configuration name with its merge parameters, e.g. ``merging_kvzap_mlp(merge_fraction=0.75,
similarity_threshold=0.5)``: two parameter settings of one press are two series. Two series are
compared on the samples both answered, at the same ``value`` (requested ratio, or DMS threshold).

Sign convention: every difference is ``a - b`` (``merge - evict``). For ``score`` (0-100) a positive
difference favours merging; for ``answer_nll`` (mean per-token NLL of the reference answer) a
*negative* difference favours merging. :data:`LOWER_IS_BETTER` names the metrics read that way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mergepress.sweep.store import read_results

METRICS = ("score", "answer_nll")
LOWER_IS_BETTER = frozenset({"answer_nll", "prefill_s", "press_s", "decode_s"})
KEY = ["task", "index", "value"]


def series_name(config: str, params: str | Mapping | None = None) -> str:
    """``config``, or ``config(k=v, ...)`` when it has merge parameters (JSON string or mapping)."""
    if isinstance(params, str):
        params = json.loads(params) if params.strip() else {}
    if not params:
        return config
    return f"{config}({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"


def add_series(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``series`` column built from ``config`` and ``params`` (missing params read as none)."""
    params = df["params"].fillna("") if "params" in df else pd.Series("", index=df.index)
    names = [series_name(c, p) for c, p in zip(df["config"], params)]
    return df.assign(params=params, series=names)


def load_sweep(*paths: str | Path) -> pd.DataFrame:
    """One or more sweep CSVs, concatenated, with a ``series`` column; failed rows are kept (see ``status``)."""
    frames = [read_results(p) for p in paths]
    return add_series(pd.concat(frames, ignore_index=True))


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose configuration ran (``status == "ok"``)."""
    df = df if "series" in df else add_series(df)
    return df[df["status"] == "ok"] if "status" in df else df


def shared_samples(df: pd.DataFrame, series: Iterable[str]) -> pd.DataFrame:
    """The ok rows of ``series``, kept only for the samples every one of them answered at all its values.

    A sweep stopped part-way (or a series added later) leaves series on different samples; their
    means are only comparable on the samples they share. A series with no ok rows constrains nothing.
    """
    ok = ok_rows(df)
    ok = ok[ok["series"].isin(list(series))]
    shared = None
    for _, rows in ok.groupby("series"):
        counts = rows.groupby(["task", "index"])["value"].nunique()
        done = set(counts[counts == rows["value"].nunique()].index)
        shared = done if shared is None else shared & done
    keep = [(t, i) in (shared or set()) for t, i in zip(ok["task"], ok["index"])]
    return ok[keep]


def pair_series(
    df: pd.DataFrame, a: str, b: str, metrics: Sequence[str] = METRICS, match_value: bool = True
) -> pd.DataFrame:
    """Series ``a`` and ``b`` side by side on the samples both answered; ``d_<metric>`` is ``a - b``.

    Rows are matched on (task, index) and, with ``match_value``, on ``value`` too; pass
    ``match_value=False`` to compare with a series run at one value only (``no_press``), whose
    ``value`` is then dropped. Samples that only one series has, or where a metric is missing in
    either, are dropped. Returns columns task, index, value, ``<metric>_a``, ``<metric>_b``,
    ``d_<metric>`` and the achieved ``ratio_a``, ``ratio_b``.
    """
    df = ok_rows(df)
    cols = [*KEY, *metrics, "compression_ratio"]
    left, right = df.loc[df["series"] == a, cols], df.loc[df["series"] == b, cols]
    on = KEY if match_value else ["task", "index"]
    if not match_value:
        right = right.drop(columns="value")
    for name, side, unique in ((a, left, KEY), (b, right, on)):
        if side.duplicated(unique).any():
            raise ValueError(f"series {name!r} has more than one row per {unique}")
    left = left.rename(columns={m: f"{m}_a" for m in metrics} | {"compression_ratio": "ratio_a"})
    right = right.rename(columns={m: f"{m}_b" for m in metrics} | {"compression_ratio": "ratio_b"})
    pairs = left.merge(right, on=on, how="inner")
    pairs = pairs.dropna(subset=[f"{m}_{s}" for m in metrics for s in "ab"])
    for m in metrics:
        pairs[f"d_{m}"] = pairs[f"{m}_a"] - pairs[f"{m}_b"]
    return pairs.sort_values(KEY).reset_index(drop=True)


@dataclass(frozen=True)
class BootstrapCI:
    """Mean of paired differences and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float


def paired_bootstrap_ci(diffs: Iterable[float], n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap interval of the mean of paired differences, resampling the pairs.

    Each of ``n_boot`` replicates draws ``n`` pairs with replacement; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the replicate means. With no pairs
    every field is NaN; with one pair the interval collapses onto it.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(list(diffs), dtype=float)
    if x.size == 0:
        return BootstrapCI(float("nan"), float("nan"), float("nan"), 0, level)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)  # bounded memory for large samples
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapCI(float(x.mean()), float(low), float(high), int(x.size), level)


def _verdict(metric: str, ci: BootstrapCI, a: str, b: str) -> str:
    """Which side the interval favours, reading ``a - b`` in the metric's direction."""
    if ci.n == 0 or np.isnan(ci.low):
        return "no pairs"
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    low, high = sorted((sign * ci.low, sign * ci.high))
    if low > 0:
        return f"{a} better"
    if high < 0:
        return f"{b} better"
    return "interval covers 0"


def compare_series(
    df: pd.DataFrame,
    a: str,
    b: str,
    metrics: Sequence[str] = METRICS,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    labels: tuple[str, str] = ("a", "b"),
) -> pd.DataFrame:
    """Per value and metric: means of ``a`` and ``b`` on paired samples, ``a - b`` and its bootstrap CI.

    ``verdict`` reads the interval in the metric's direction (lower is better for ``answer_nll``):
    ``"<a> better"`` / ``"<b> better"`` when it excludes 0, else ``"interval covers 0"``.
    """
    pairs = pair_series(df, a, b, metrics)
    rows = []
    for value, group in pairs.groupby("value"):
        for m in metrics:
            ci = paired_bootstrap_ci(group[f"d_{m}"], n_boot=n_boot, seed=seed, level=level)
            rows.append(
                {
                    "value": value,
                    "metric": m,
                    "n_pairs": ci.n,
                    labels[0]: group[f"{m}_a"].mean(),
                    labels[1]: group[f"{m}_b"].mean(),
                    f"{labels[0]} - {labels[1]}": ci.mean,
                    "ci_low": ci.low,
                    "ci_high": ci.high,
                    "verdict": _verdict(m, ci, labels[0], labels[1]),
                    f"ratio {labels[0]}": group["ratio_a"].mean(),
                    f"ratio {labels[1]}": group["ratio_b"].mean(),
                }
            )
    return pd.DataFrame(rows)


def merge_vs_evict(df: pd.DataFrame, merge: str, evict: str, **options) -> pd.DataFrame:
    """:func:`compare_series` (same ``options``) with columns named ``merge``, ``evict`` and ``merge - evict``.

    For ``score`` a positive ``merge - evict`` favours merging; for ``answer_nll`` a negative one does.
    """
    return compare_series(df, merge, evict, labels=("merge", "evict"), **options)


def task_outcomes(df: pd.DataFrame, merge: str, evict: str, metric: str = "score", tol: float = 0.0) -> pd.DataFrame:
    """Per value and task, the paired means of ``merge`` and ``evict`` and whether merging won.

    A task is a ``win`` when its mean difference is better than ``tol`` in the metric's direction
    (above for ``score``, below for ``answer_nll``), a ``loss`` when worse by more than ``tol``,
    else a ``tie`` — the per-task counting of the seed, on task means.
    """
    pairs = pair_series(df, merge, evict, [metric])
    out = pairs.groupby(["value", "task"]).agg(
        n=(f"d_{metric}", "size"), merge=(f"{metric}_a", "mean"), evict=(f"{metric}_b", "mean")
    )
    out["diff"] = out["merge"] - out["evict"]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    gain = sign * out["diff"]
    out["outcome"] = np.where(gain > tol, "win", np.where(gain < -tol, "loss", "tie"))
    return out.reset_index()


def win_loss(df: pd.DataFrame, merge: str, evict: str, metric: str = "score", tol: float = 0.0) -> pd.DataFrame:
    """Per value: how many tasks merging won, lost and tied (see :func:`task_outcomes`)."""
    outcomes = task_outcomes(df, merge, evict, metric, tol)
    counts = outcomes.groupby("value")["outcome"].value_counts().unstack(fill_value=0)
    counts = counts.reindex(columns=["win", "loss", "tie"], fill_value=0)
    counts.columns = ["wins", "losses", "ties"]
    return counts.reset_index()


def series_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per series and value: samples, mean score and NLL, achieved ratio, and mean seconds per stage."""
    ok = ok_rows(df)
    return (
        ok.groupby(["series", "value"])
        .agg(
            n=("score", "size"),
            score=("score", "mean"),
            answer_nll=("answer_nll", "mean"),
            ratio=("compression_ratio", "mean"),
            prefill_s=("prefill_s", "mean"),
            press_s=("press_s", "mean"),
            decode_s=("decode_s", "mean"),
        )
        .reset_index()
    )


def seed_points(seed: pd.DataFrame) -> pd.DataFrame:
    """The seed's ``score`` rows as (series, value, task, seed_score), ``value`` read as in our sweeps.

    Our ``value`` is the ratio asked for, or the DMS threshold; so is the seed point's. A point
    printed twice (an average in two tables passed together) is kept once.
    """
    seed = seed[seed["quantity"] == "score"] if "quantity" in seed else seed
    seed = add_series(seed)
    value = seed["threshold"].where(seed["threshold"].notna(), seed["compression_ratio"])
    points = pd.DataFrame({"series": seed["series"], "value": value, "task": seed["task"], "seed_score": seed["value"]})
    return points.drop_duplicates(["series", "value", "task"]).reset_index(drop=True)


def seed_layout(
    ours: pd.DataFrame,
    seed: pd.DataFrame | None,
    columns: Mapping[str, str],
    values: Sequence[float] | None = None,
    metric: str = "score",
) -> pd.DataFrame:
    """Per-task table in the seed's layout: rows = task, columns = (value, column, ours | seed).

    ``columns`` maps a column label (``"evict"``, ``"merge"``, ...) to a series name; the seed's rows
    (:func:`mergepress.seed.seed_scores`, per-task table) are matched on the same series and value, and
    left empty where the seed has no such cell. Two rows close the table: ``mean (tasks run)``, over
    the tasks we ran, for both sources (so the seed's number is comparable with ours), and
    ``seed average (printed)``, the seed's own average over its 13 tasks.
    """
    ok = ok_rows(ours)
    ours_means = ok.groupby(["series", "value", "task"])[metric].mean()
    seed = seed_points(seed) if seed is not None else None
    if values is None:
        values = sorted(ok.loc[ok["series"].isin(columns.values()), "value"].unique())
    tasks_run = sorted(ok["task"].unique())
    seed_tasks = sorted(set(seed["task"]) - {"average"}) if seed is not None else []
    index = tasks_run + [t for t in seed_tasks if t not in tasks_run]
    table = {}
    for value in values:
        for label, series in columns.items():
            mine = ours_means.get((series, value))
            if mine is None or mine.empty:
                continue
            col = mine.reindex(index)
            table[(value, label, "ours")] = [*col, col.reindex(tasks_run).mean(), np.nan]
            if seed is None:
                continue
            match = (seed["series"] == series) & np.isclose(seed["value"], value)
            cells = seed[match].set_index("task")["seed_score"]
            if cells.empty:
                continue
            per_task = cells.drop(index="average", errors="ignore").reindex(index)
            printed = cells.get("average", np.nan)
            table[(value, label, "seed")] = [*per_task, per_task.reindex(tasks_run).mean(), printed]
    out = pd.DataFrame(table, index=[*index, "mean (tasks run)", "seed average (printed)"])
    out.columns = pd.MultiIndex.from_tuples(out.columns, names=["value", "column", "source"])
    out.index.name = "task"
    return out


def plot_ratio_curves(
    ours: pd.DataFrame,
    series: Mapping[str, str],
    seed: pd.DataFrame | None = None,
    x: str = "value",
    path: str | Path | None = None,
    title: str = "",
    shared: bool = True,
):
    """Score against compression for each series: ours, the seed's, and our answer NLL; three panels.

    With ``shared`` (the default) our series are drawn on the samples they all answered
    (:func:`shared_samples`), so their curves compare like with like; the count goes in the title.

    ``series`` maps a legend label to a series name (``no_press`` is drawn as a horizontal line).
    ``x="value"`` puts the requested ratio (or DMS threshold) on the horizontal axis,
    ``x="compression_ratio"`` the achieved ratio. The seed panel uses the seed's printed averages
    (``task == "average"``) where it has them, else the mean of its per-task rows, against its ratio
    (or threshold). Error bars: 95% normal intervals of the per-sample mean. Saved to ``path`` if given.
    """
    import matplotlib.pyplot as plt

    ok = shared_samples(ours, series.values()) if shared else ok_rows(ours)
    if shared:
        title = f"{title} ({ok.groupby(['task', 'index']).ngroups} samples answered by every series)".strip()
    fig, axes = plt.subplots(1, 3 if seed is not None else 2, figsize=(15 if seed is not None else 10, 4))
    score_ax, nll_ax = axes[0], axes[-1]
    colors = dict(zip(series, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for label, name in series.items():
        rows = ok[ok["series"] == name]
        if rows.empty:
            continue
        stats = rows.groupby("value").agg(
            x=(x, "mean"),
            score=("score", "mean"),
            score_se=("score", "sem"),
            nll=("answer_nll", "mean"),
            nll_se=("answer_nll", "sem"),
        )
        for ax, col in ((score_ax, "score"), (nll_ax, "nll")):
            if len(stats) == 1 and name == "no_press":
                ax.axhline(stats[col].iloc[0], color="0.4", ls="--", lw=1, label=label)
            else:
                ax.errorbar(
                    stats["x"],
                    stats[col],
                    yerr=1.96 * stats[f"{col}_se"].fillna(0),
                    marker="o",
                    capsize=3,
                    color=colors[label],
                    label=label,
                )
    xlabel = {"value": "compression ratio asked (or DMS threshold)", "compression_ratio": "achieved ratio"}.get(x, x)
    score_ax.set(title="score (ours)", xlabel=xlabel, ylabel="RULER score (0-100)")
    nll_ax.set(title="answer NLL (ours, lower is better)", xlabel=xlabel, ylabel="mean per-token NLL")
    if seed is not None:
        seed_ax = axes[1]
        seed = seed_points(seed)
        for label, name in series.items():
            rows = seed[seed["series"] == name]
            if rows.empty:
                continue
            printed = rows[rows["task"] == "average"]
            curve = printed if not printed.empty else rows.groupby("value", as_index=False)["seed_score"].mean()
            curve = curve.sort_values("value")
            if len(curve) == 1 and name == "no_press":
                seed_ax.axhline(curve["seed_score"].iloc[0], color="0.4", ls="--", lw=1, label=label)
            else:
                seed_ax.plot(curve["value"], curve["seed_score"], "o-", color=colors[label], label=label)
        seed_ax.set(title="score (seed: Qwen3-8B, RULER-4096)", xlabel="compression ratio (or DMS threshold)")
        seed_ax.legend(fontsize=8)
    score_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
