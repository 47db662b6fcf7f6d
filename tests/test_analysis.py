"""mergepress.analysis on small hand-made sweep frames whose answers can be worked out by hand."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mergepress.analysis import (  # noqa: E402
    add_series,
    load_sweep,
    merge_vs_evict,
    pair_series,
    paired_bootstrap_ci,
    plot_ratio_curves,
    seed_layout,
    series_name,
    shared_samples,
    task_outcomes,
    win_loss,
)
from mergepress.headline import comparisons, evict_partner, mean_table  # noqa: E402
from mergepress.headline import main as headline_main  # noqa: E402
from mergepress.sweep.store import COLUMNS, ResultStore  # noqa: E402

KV = '{"merge_fraction": 0.75, "similarity_threshold": 0.5}'


def rows(config: str, value: float, scores: dict, nll: dict | None = None, params: str = "", status: str = "ok"):
    """One row per (task, index) -> score; NLL defaults to 1 - score / 100."""
    return [
        {
            "task": task,
            "index": index,
            "config": config,
            "value": value,
            "params": params,
            "status": status,
            "compression_ratio": value,
            "score": score,
            "answer_nll": (nll or {}).get((task, index), 1 - score / 100),
            "prefill_s": 1.0,
            "press_s": 0.1,
            "decode_s": 0.5,
        }
        for (task, index), score in scores.items()
    ]


@pytest.fixture
def sweep() -> pd.DataFrame:
    """Two tasks x 3 samples at ratio 0.5, merge +10 on vt and -10 on one cwe sample; ratio 0.75 only on vt."""
    evict = {("vt", 0): 50, ("vt", 1): 60, ("vt", 2): 70, ("cwe", 0): 40, ("cwe", 1): 40, ("cwe", 2): 40}
    merge = {k: v + 10 if k[0] == "vt" else v for k, v in evict.items()} | {("cwe", 0): 30}
    data = (
        rows("knorm", 0.5, evict)
        + rows("merging_knorm", 0.5, merge)
        + rows("knorm", 0.75, {("vt", 0): 20, ("vt", 1): 20})
        + rows("merging_knorm", 0.75, {("vt", 0): 20, ("vt", 1): 30, ("vt", 5): 90})  # ("vt", 5) unmatched
        + rows("no_press", 0.0, {k: 100 for k in evict})
    )
    return add_series(pd.DataFrame(data))


def test_series_name_separates_parameter_settings():
    assert series_name("merging_kvzap_mlp", "") == "merging_kvzap_mlp"
    assert series_name("merging_kvzap_mlp", None) == "merging_kvzap_mlp"
    named = series_name("merging_kvzap_mlp", KV)
    assert named == "merging_kvzap_mlp(merge_fraction=0.75, similarity_threshold=0.5)"
    assert named == series_name("merging_kvzap_mlp", {"similarity_threshold": 0.5, "merge_fraction": 0.75})
    frame = add_series(pd.DataFrame({"config": ["m", "m"], "params": [np.nan, KV]}))
    assert frame["series"].nunique() == 2 and frame["params"].iloc[0] == ""


def test_pairing_drops_unmatched_rows(sweep):
    pairs = pair_series(sweep, "merging_knorm", "knorm")
    assert len(pairs) == 8  # 6 at 0.5, 2 at 0.75; merge's ("vt", 5) at 0.75 has no partner
    assert not ((pairs["task"] == "vt") & (pairs["index"] == 5)).any()
    at_075 = pairs[pairs["value"] == 0.75].set_index("index")["d_score"]
    assert at_075.to_dict() == {0: 0, 1: 10}
    # the NLL difference follows the score's: nll = 1 - score / 100
    assert np.allclose(pairs["d_answer_nll"], -pairs["d_score"] / 100)


def test_pairing_drops_failed_rows_and_matches_value(sweep):
    failed = pd.DataFrame(rows("knorm", 0.5, {("vt", 0): np.nan}, status="failed: OutOfMemoryError"))
    frame = pd.concat([sweep[~((sweep.config == "knorm") & (sweep.task == "vt") & (sweep["index"] == 0))], failed])
    pairs = pair_series(frame, "merging_knorm", "knorm")
    assert len(pairs[pairs["value"] == 0.5]) == 5
    # no_press is run at value 0 only: pairing on the value finds nothing, pairing without it finds all 6
    assert pair_series(sweep, "merging_knorm", "no_press").empty
    assert len(pair_series(sweep, "merging_knorm", "no_press", match_value=False)) == 8


def test_pairing_refuses_duplicate_rows(sweep):
    with pytest.raises(ValueError, match="more than one row"):
        pair_series(pd.concat([sweep, sweep]), "merging_knorm", "knorm")


def test_bootstrap_of_a_constant_difference_is_that_constant():
    ci = paired_bootstrap_ci([2.5] * 40, n_boot=500)
    assert (ci.mean, ci.low, ci.high, ci.n) == (2.5, 2.5, 2.5, 40)


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    diffs = [0, 0, 10, 10]
    ci = paired_bootstrap_ci(diffs, n_boot=4000, seed=1)
    assert ci.mean == 5.0
    assert 0 <= ci.low < 5 < ci.high <= 10
    assert ci == paired_bootstrap_ci(diffs, n_boot=4000, seed=1)
    # the replicate means of 4 draws lie on a grid of 2.5; the 95% interval cuts off the extremes 0 and 10
    assert ci.low == 0 or ci.low == 2.5
    narrow = paired_bootstrap_ci(diffs, n_boot=4000, seed=1, level=0.5)
    assert narrow.low >= ci.low and narrow.high <= ci.high


def test_bootstrap_edge_cases():
    assert paired_bootstrap_ci([]).n == 0 and np.isnan(paired_bootstrap_ci([]).mean)
    one = paired_bootstrap_ci([-3.0], n_boot=100)
    assert (one.low, one.high) == (-3.0, -3.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0], level=1.5)


def test_merge_vs_evict_signs_and_verdicts(sweep):
    table = merge_vs_evict(sweep, "merging_knorm", "knorm", n_boot=2000).set_index(["value", "metric"])
    row = table.loc[(0.5, "score")]
    assert row["n_pairs"] == 6
    assert row["merge - evict"] == pytest.approx((10 + 10 + 10 - 10) / 6)
    assert row["merge"] == pytest.approx(row["evict"] + row["merge - evict"])
    # NLL lower is better: its difference has the opposite sign of the score's
    nll = table.loc[(0.5, "answer_nll")]
    assert nll["merge - evict"] == pytest.approx(-row["merge - evict"] / 100)
    assert nll["verdict"] == row["verdict"]


def test_verdict_reads_nll_downwards():
    better = {("vt", i): 50 for i in range(10)}
    data = rows("knorm", 0.5, better, nll={k: 2.0 for k in better}) + rows(
        "merging_knorm", 0.5, better, nll={k: 1.0 for k in better}
    )
    table = merge_vs_evict(pd.DataFrame(data), "merging_knorm", "knorm", n_boot=200).set_index("metric")
    assert table.loc["answer_nll", "merge - evict"] == -1.0
    assert table.loc["answer_nll", "verdict"] == "merge better"
    assert table.loc["score", "verdict"] == "interval covers 0"
    worse = merge_vs_evict(pd.DataFrame(data), "knorm", "merging_knorm", n_boot=200).set_index("metric")
    assert worse.loc["answer_nll", "verdict"] == "evict better"


def test_win_loss_counts(sweep):
    outcomes = task_outcomes(sweep, "merging_knorm", "knorm").set_index(["value", "task"])
    assert outcomes.loc[(0.5, "vt"), "outcome"] == "win"  # +10 on every sample
    assert outcomes.loc[(0.5, "cwe"), "outcome"] == "loss"  # -10 on one sample of three
    assert outcomes.loc[(0.75, "vt"), "outcome"] == "win"
    counts = win_loss(sweep, "merging_knorm", "knorm").set_index("value")
    assert counts.loc[0.5].tolist() == [1, 1, 0]
    assert counts.loc[0.75].tolist() == [1, 0, 0]
    # a tolerance of 10 points turns both 0.5 outcomes (+10, -3.3) into ties
    assert win_loss(sweep, "merging_knorm", "knorm", tol=10).set_index("value").loc[0.5].tolist() == [0, 0, 2]
    # on NLL the direction flips but the outcome does not (nll = 1 - score / 100)
    nll = win_loss(sweep, "merging_knorm", "knorm", metric="answer_nll").set_index("value")
    assert nll.loc[0.5].tolist() == [1, 1, 0]


def test_seed_layout_puts_ours_beside_the_seed(sweep):
    seed = pd.DataFrame(
        {
            "press": "KnormPress",
            "variant": ["evict", "evict", "evict", "merge"],
            "config": ["knorm", "knorm", "knorm", "merging_knorm"],
            "params": "",
            "compression_ratio": [0.5, 0.5, 0.5, 0.5],
            "threshold": np.nan,
            "task": ["vt", "qa_1", "average", "vt"],
            "quantity": "score",
            "value": [93.0, 58.0, 75.0, 96.0],
        }
    )
    table = seed_layout(sweep, seed, {"evict": "knorm", "merge": "merging_knorm"}, values=[0.5])
    assert table.loc["vt", (0.5, "evict", "ours")] == 60
    assert table.loc["vt", (0.5, "evict", "seed")] == 93
    assert table.loc["vt", (0.5, "merge", "seed")] == 96
    assert table.loc["cwe", (0.5, "merge", "ours")] == pytest.approx(110 / 3)
    assert np.isnan(table.loc["cwe", (0.5, "evict", "seed")])  # a cell the seed does not print
    assert np.isnan(table.loc["qa_1", (0.5, "evict", "ours")])  # a task we did not run
    # the closing rows: mean over the tasks we ran (seed: vt only here), and the seed's printed average
    assert table.loc["mean (tasks run)", (0.5, "evict", "ours")] == pytest.approx((60 + 40) / 2)
    assert table.loc["mean (tasks run)", (0.5, "evict", "seed")] == 93
    assert table.loc["seed average (printed)", (0.5, "evict", "seed")] == 75
    assert np.isnan(table.loc["seed average (printed)", (0.5, "merge", "seed")])


def test_seed_layout_keys_dms_by_threshold():
    data = rows("dms_kvzap_mlp", -3.0, {("vt", 0): 80}) + rows(
        "merging_dms_kvzap_mlp", -3.0, {("vt", 0): 90}, params=KV
    )
    seed = pd.DataFrame(
        {
            "config": "merging_dms_kvzap_mlp",
            "params": [KV, ""],
            "compression_ratio": np.nan,
            "threshold": -3.0,
            "task": "vt",
            "quantity": "score",
            "value": [100.0, 99.0],
        }
    )
    merge = series_name("merging_dms_kvzap_mlp", KV)
    table = seed_layout(pd.DataFrame(data), seed, {"evict": "dms_kvzap_mlp", "merge mf": merge})
    assert table.loc["vt", (-3.0, "merge mf", "ours")] == 90
    assert table.loc["vt", (-3.0, "merge mf", "seed")] == 100  # not the default-params cell (99)
    assert (-3.0, "evict", "seed") not in table.columns


def test_load_sweep_and_plot(tmp_path, sweep):
    path = tmp_path / "sweep.csv"
    store = ResultStore(path, {"model": "test"})
    for row in sweep.drop(columns="series").to_dict("records"):
        store.append(row)
    loaded = load_sweep(path)
    assert list(loaded.columns[: len(COLUMNS)]) == COLUMNS
    assert len(loaded) == len(sweep) and set(loaded["series"]) == set(sweep["series"])
    figure = tmp_path / "figures" / "curves.png"
    series = {"evict": "knorm", "merge": "merging_knorm", "no press": "no_press"}
    fig = plot_ratio_curves(loaded, series, seed=None, path=figure)
    assert figure.exists() and len(fig.axes) == 2


def test_headline_pairs_each_merging_series_with_its_evicting_partner(sweep):
    assert evict_partner("merging_knorm") == "knorm"
    assert evict_partner("upstream_merging_knorm") == "knorm"
    assert evict_partner(series_name("merging_dms_kvzap_mlp", {"merge_fraction": 0.75})) == "dms_kvzap_mlp"
    table = comparisons(sweep, n_boot=200)
    assert set(table["merge series"]) == {"merging_knorm"}  # no_press has no partner and is not compared
    at_05 = table[(table["value"] == 0.5) & (table["metric"] == "score")].iloc[0]
    assert at_05["n_pairs"] == 6 and at_05["merge - evict"] == pytest.approx(20 / 6)  # +10 x 3 on vt, -10 on cwe 0
    means = mean_table(sweep, "score")
    assert means.loc["merging_knorm", 0.75] == pytest.approx(140 / 3)  # its own 3 samples, unmatched one included
    assert means.loc["merging_knorm", 0.75] != means.loc["knorm", 0.75]
    assert np.isnan(means.loc["no_press", 0.5])


def test_headline_cli_writes_a_report_and_refuses_missing_files(tmp_path, sweep, capsys):
    path = tmp_path / "knorm.csv"
    store = ResultStore(path, {"model": "test"})
    for row in sweep.drop(columns="series").to_dict("records"):
        store.append(row)
    out = tmp_path / "HEADLINE.md"
    figure = tmp_path / "figures" / "headline.png"
    assert headline_main([str(path), "--n-boot", "100", "--out", str(out), "--figure", str(figure)]) == 0
    assert figure.stat().st_size > 0
    text = out.read_text()
    assert "## knorm.csv" in text and "python -m mergepress.headline" in text and "## Summary" in text
    assert "| merging_knorm" in text and "interval covers 0" in text
    with pytest.raises(SystemExit):
        headline_main([str(tmp_path / "missing.csv")])
    assert "no such sweep file" in capsys.readouterr().err


def test_shared_samples_keeps_what_every_series_answered_at_all_its_values(sweep):
    shared = shared_samples(sweep, ["knorm", "merging_knorm", "no_press"])
    # knorm ran ratio 0.75 on vt 0 and 1 only; merging_knorm's extra vt 5 has no 0.5 row
    assert set(zip(shared["task"], shared["index"])) == {("vt", 0), ("vt", 1)}
    assert set(shared["series"]) == {"knorm", "merging_knorm", "no_press"}
    assert len(shared_samples(sweep, ["no_press"])) == 6
    # a series with no rows (not run yet) constrains nothing
    assert shared_samples(sweep, ["knorm", "missing_series"]).equals(shared_samples(sweep, ["knorm"]))
