"""The headline numbers of the RULER sweeps, as one Markdown report built from the committed CSVs.

    python -m mergepress.headline results/ruler-2048/{knorm,kvzap,dms}.csv --out results/ruler-2048/HEADLINE.md

For each sweep file, per series and value (requested ratio, or DMS threshold): the samples answered,
the mean RULER score and answer NLL, the achieved compression ratio and the seconds per sample; then
every merge − evict comparison the file holds, as a paired bootstrap 95% interval on the samples both
series answered (:func:`mergepress.analysis.merge_vs_evict`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

from mergepress.analysis import load_sweep, merge_vs_evict, ok_rows
from mergepress.sweep.registry import base_name


def evict_partner(series: str) -> str:
    """The evicting series a merging one is compared with: ``merging_knorm(merge_fraction=0.75)`` → ``knorm``."""
    return base_name(series.split("(")[0])


def mean_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows = series, columns = value: the mean of a column of ``df`` over the ok rows, or their count (``"n"``)."""
    ok = ok_rows(df)
    if metric == "n":
        return ok.pivot_table(index="series", columns="value", values="score", aggfunc="size")
    return ok.pivot_table(index="series", columns="value", values=metric, aggfunc="mean")


def comparisons(df: pd.DataFrame, n_boot: int = 10000) -> pd.DataFrame:
    """merge − evict for every merging series whose evicting partner is in ``df`` (all paired samples)."""
    present = set(df["series"])
    frames = {
        merge: merge_vs_evict(df, merge, evict_partner(merge), n_boot=n_boot)
        for merge in sorted(present)
        if evict_partner(merge) != merge.split("(")[0] and evict_partner(merge) in present
    }
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, names=["merge series"]).reset_index(level=0)


def summary_table(cmp: pd.DataFrame) -> pd.DataFrame:
    """One row per merging series and value: pairs, achieved ratio, evict and merge mean score on those
    pairs, and merge − evict with its 95% interval for the score and the answer NLL."""
    rows = []
    for (name, value), g in cmp.groupby(["merge series", "value"], sort=False):
        score, nll = (g[g["metric"] == m].iloc[0] for m in ("score", "answer_nll"))
        rows.append(
            {
                "merge series": name,
                "value": value,
                "ratio": score["ratio evict"],
                "pairs": score["n_pairs"],
                "evict score": score["evict"],
                "merge score": score["merge"],
                "Δ score [95% CI]": f"{score['merge - evict']:+.1f} [{score['ci_low']:+.1f}, {score['ci_high']:+.1f}]",
                "Δ NLL [95% CI]": f"{nll['merge - evict']:+.3f} [{nll['ci_low']:+.3f}, {nll['ci_high']:+.3f}]",
            }
        )
    return pd.DataFrame(rows)


def report(path: Path, n_boot: int = 10000) -> tuple[str, pd.DataFrame]:
    """The Markdown section for one sweep file, and its merge − evict table (:func:`comparisons`)."""
    df = load_sweep(path)
    ok = ok_rows(df).assign(seconds=lambda d: d["prefill_s"] + d["press_s"] + d["decode_s"])
    per_task = ok.groupby("task")["index"].nunique()
    lines = [f"## {path.name}", ""]
    lines += [
        f"{len(df)} rows ({(df['status'] != 'ok').sum()} failed) on {ok.groupby(['task', 'index']).ngroups} samples"
        f" over {len(per_task)} tasks ({per_task.min()}–{per_task.max()} per task). Each cell is the mean over the"
        " samples that series answered at that value (`n`); a sweep stopped part-way can leave series with different"
        " samples, so compare series with the paired table at the end.",
        "",
    ]
    for metric, title, fmt in (
        ("n", "Samples answered", ".0f"),
        ("score", "Mean RULER score (0–100)", ".1f"),
        ("answer_nll", "Mean answer NLL (nats per token, lower is better)", ".3f"),
        ("compression_ratio", "Achieved compression ratio", ".3f"),
        ("press_s", "Seconds per sample in the press (scoring, and merging where it merges)", ".3f"),
        ("seconds", "Seconds per sample: shared prefill + press + answer (and its NLL)", ".2f"),
    ):
        table = mean_table(ok, metric).reset_index()
        table = table.astype(object).where(table.notna(), None)  # tabulate writes `missingval` for None only
        lines += [f"**{title}**", "", table.to_markdown(index=False, floatfmt=fmt, missingval="–"), ""]
    cmp = comparisons(df, n_boot)
    if len(cmp):
        cols = ["merge series", "value", "metric", "n_pairs", "merge", "evict", "merge - evict", "ci_low", "ci_high"]
        lines += ["**merge − evict on every paired sample, 95% paired bootstrap interval**", ""]
        lines += [cmp[cols + ["verdict"]].to_markdown(index=False, floatfmt=".3f"), ""]
    return "\n".join(lines), cmp


def plot_headline(cmp: pd.DataFrame, path: Path | None = None):
    """merge − evict and its 95% interval against the achieved ratio, one line per merging series.

    ``cmp`` is :func:`comparisons` output (several files concatenated); kvpress's own MergingPress
    (``upstream_merging_*``) is left out, as its answers match ours. Two panels: score and answer NLL.
    """
    import matplotlib.pyplot as plt  # imported here: the report itself needs no plotting backend

    cmp = cmp[~cmp["merge series"].str.startswith("upstream_")]
    names = list(dict.fromkeys(cmp["merge series"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (
        ("score", "RULER score: merge − evict (> 0: merge better)"),
        ("answer_nll", "answer NLL: merge − evict (< 0: merge better)"),
    )
    for ax, (metric, label) in zip(axes, panels):
        for k, name in enumerate(names):
            g = cmp[(cmp["merge series"] == name) & (cmp["metric"] == metric)].sort_values("ratio evict")
            x = g["ratio evict"] + 0.004 * (k - (len(names) - 1) / 2)  # dodge overlapping intervals
            err = [g["merge - evict"] - g["ci_low"], g["ci_high"] - g["merge - evict"]]
            ax.errorbar(x, g["merge - evict"], yerr=err, marker="o", ms=4, capsize=3, label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("achieved compression ratio")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mergepress.headline", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep CSVs (mergepress.sweep --out)")
    parser.add_argument("--out", type=Path, help="write the report here (default: print it)")
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples per interval")
    parser.add_argument("--figure", type=Path, help="also draw every merge − evict interval into this PNG")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.is_file()]
    if missing:
        parser.error(f"no such sweep file: {', '.join(missing)}")
    sections, tables = zip(*(report(p, args.n_boot) for p in args.paths))
    cmp = pd.concat(tables, ignore_index=True)
    summary = summary_table(cmp)
    text = "\n".join(
        [
            f"# RULER sweeps: headline numbers\n\nMade by `python -m mergepress.headline {shlex.join(argv)}`.\n",
            "## Summary: merge − evict on paired samples\n",
            "Scores are means over the pairs (0–100); Δ = merge − evict with its 95% paired bootstrap interval;"
            " for NLL a negative Δ favours merging. `value` is the requested ratio, or the DMS threshold.\n",
            summary.to_markdown(index=False, floatfmt=("", "g", ".3f", "g", ".1f", ".1f", "", "")) + "\n",
        ]
        + list(sections)
    )
    if args.figure:
        plot_headline(cmp, args.figure)
        print(f"wrote {args.figure}")
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
