"""The transcribed seed tables agree with themselves: per-task means, deltas and lifts match what the seed prints.

Tolerances are those of rounding, nothing more. A per-task score printed to 0.1 is off by at most 0.05,
so the mean of printed scores is within 0.05 of the true mean, which the printed average rounds to its
last digit: ``|mean - average| <= 0.05 + half a unit of the average's last digit``. A printed delta
``merge - evict`` is within ``0.05 + 0.05`` of the difference of the printed scores plus its own 0.05.
All of the seed's averages are over its 13 RULER tasks (qa_1 and qa_2 included).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mergepress.seed import (
    AVERAGE_TABLES,
    SEED_TASK_LABELS,
    TABLES,
    TASK_TABLES,
    decimals,
    load_seed_table,
    seed_average,
    seed_scores,
    seed_win_loss,
)

SERIES = ["config", "params", "compression_ratio", "threshold"]
PER_TASK = 0.05  # half a unit of the per-task scores' last digit (all printed to 0.1)
# The one seed average that its own per-task table does not reproduce (see results/seed/README.md):
# DMS(KVzap) t=-3, MergingPress merge_fraction=0.75: the tasks average 93.76, the summary prints 93.68.
KNOWN_MISMATCH = {("merging_dms_kvzap_mlp", '{"merge_fraction": 0.75}', -3.0)}


def _half_unit(printed: str) -> float:
    return 0.5 * 10.0 ** -decimals(printed)


def _key(row) -> tuple:
    ratio = None if pd.isna(row.compression_ratio) else float(row.compression_ratio)
    threshold = None if pd.isna(row.threshold) else float(row.threshold)
    return (row.config, row.params, ratio, threshold)


def _reported_averages(table: str) -> pd.DataFrame:
    """The averages the seed prints for a per-task table (DMS prints them in a separate summary)."""
    if table == "dms_tasks":
        summary = seed_scores("dms_summary")
        return summary[summary["config"] != "no_press"]  # no_press of that run has no per-task table
    scores = seed_scores(table)
    return scores[scores["task"] == "average"]


@pytest.mark.parametrize("name", TABLES)
def test_table_loads_with_the_common_layout(name):
    df = load_seed_table(name)
    assert list(df.columns[:4]) == ["press", "variant", "config", "params"]
    assert len(df) > 0 and df["value"].notna().all()
    assert (df["line"] > 0).all()
    # the number as printed and the parsed value agree
    parsed = df["printed"].str.replace("\u2212", "-").str.rstrip("%").astype(float)
    assert (parsed == df["value"]).all()


def test_unknown_table_is_refused():
    with pytest.raises(ValueError, match="unknown seed table"):
        load_seed_table("knorm")


@pytest.mark.parametrize("name", TASK_TABLES)
def test_every_series_covers_the_13_seed_tasks(name):
    scores = seed_scores(name)
    per_task = scores[scores["task"] != "average"]
    counts = per_task.groupby(["config", "params", "compression_ratio", "threshold"], dropna=False)["task"]
    assert (counts.nunique() == 13).all()
    assert (counts.size() == 13).all()
    assert set(per_task["task"]) == set(SEED_TASK_LABELS.values())


@pytest.mark.parametrize("name", TASK_TABLES)
def test_mean_of_tasks_is_the_reported_average(name):
    computed = {_key(r): r.score for r in seed_average(name).itertuples()}
    reported = _reported_averages(name)
    assert len(reported) > 0
    checked = 0
    for row in reported.itertuples():
        key = _key(row)
        assert key in computed, f"reported average {key} has no per-task rows"
        error = abs(computed[key] - row.value)
        if (row.config, row.params, key[3]) in KNOWN_MISMATCH:
            assert error > PER_TASK + _half_unit(row.printed), "the recorded discrepancy went away: update README"
            continue
        assert error <= PER_TASK + _half_unit(row.printed) + 1e-9, (key, computed[key], row.value)
        checked += 1
    assert checked >= 4


def test_dms_discrepancy_is_beyond_rounding():
    """t=-3, merge_fraction=0.75: 13 tasks average 1218.9 / 13 = 93.76; the summary prints 93.68 (and +0.29)."""
    avg = seed_average("dms_tasks").set_index(["config", "params", "threshold"])["score"]
    assert avg[("merging_dms_kvzap_mlp", '{"merge_fraction": 0.75}', -3.0)] == pytest.approx(1218.9 / 13)


@pytest.mark.parametrize("name", TASK_TABLES + ("knorm_average", "adakv_average", "kvzap_average", "dms_summary"))
def test_printed_delta_is_merge_minus_evict(name):
    df = load_seed_table(name)
    scores = df[df["quantity"] == "score"]
    point = ["compression_ratio", "threshold", "task"]
    evict = scores[scores["variant"] == "evict"][point + ["value"]].rename(columns={"value": "evict"})
    merge = scores[scores["variant"] == "merge"][SERIES + ["task", "value"]].rename(columns={"value": "merge"})
    delta = df[df["quantity"] == "delta"][SERIES + ["task", "value", "printed"]]
    both = delta.merge(merge, on=SERIES + ["task"]).merge(evict, on=point)
    assert len(both) == len(delta) > 0
    for row in both.itertuples():
        # the seed's Δ is computed before rounding: each printed score is off by at most half a unit
        bound = 2 * _half_unit(row.printed) + _half_unit(row.printed)
        assert abs((row.merge - row.evict) - row.value) <= bound + 1e-9, row


@pytest.mark.parametrize("tasks, averages", [("knorm_tasks", "knorm_average"), ("kvzap_tasks", "kvzap_average")])
def test_average_table_repeats_the_task_table(tasks, averages):
    row_avg = seed_scores(tasks).query("task == 'average' and variant != 'no_press'")
    table = seed_scores(averages)
    merged = row_avg.merge(table, on=SERIES, suffixes=("_row", "_table"))
    assert len(merged) == len(table) > 0
    assert (merged["value_row"] == merged["value_table"]).all()


@pytest.mark.parametrize("tasks, averages", [("knorm_tasks", "knorm_average"), ("kvzap_tasks", "kvzap_average")])
def test_lift_is_delta_over_evict_from_unrounded_means(tasks, averages):
    """The % lift was computed from unrounded averages; our means of the per-task scores reproduce it."""
    means = seed_average(tasks).set_index(["variant", "compression_ratio"])["score"]
    lifts = load_seed_table(averages).query("quantity == 'lift_pct'")
    assert len(lifts) >= 3
    for row in lifts.itertuples():
        merge, evict = means[("merge", row.compression_ratio)], means[("evict", row.compression_ratio)]
        assert 100 * (merge - evict) / evict == pytest.approx(row.value, abs=_half_unit(row.printed) + 0.02)


def test_ea_average_table_agrees_with_its_task_table_at_075():
    avg = seed_scores("expected_attention_average").query("compression_ratio in (0.0, 0.75)")
    rows = seed_scores("expected_attention_tasks").query("task == 'average'")
    merged = avg.merge(rows, on=SERIES, suffixes=("_avg", "_row"))
    assert len(merged) == 4  # no_press, M(EA), EA, AdaKV(EA)
    assert (merged["value_avg"] == merged["value_row"]).all()


def test_seed_ratio_labels_and_params():
    knorm = load_seed_table("knorm_tasks")
    assert set(knorm.loc[knorm["cr_label"] == "0.88", "compression_ratio"]) == {0.875}
    kvzap = seed_scores("kvzap_tasks")
    assert set(kvzap.loc[kvzap["variant"] == "merge", "params"]) == {
        '{"merge_fraction": 0.75, "similarity_threshold": 0.5}'
    }
    dms = seed_scores("dms_tasks")
    assert set(dms["params"]) == {"", '{"merge_fraction": 0.75}'}
    assert dms["compression_ratio"].isna().all() and set(dms["threshold"]) == {-4.0, -3.0}


def test_no_press_agrees_across_the_f01_tables():
    """EA and KVzap were run at fraction 0.1 with the same no_press: same 13 per-task scores."""
    ea = seed_scores("expected_attention_tasks").query("config == 'no_press'").set_index("task")["value"]
    kz = seed_scores("kvzap_tasks").query("config == 'no_press'").set_index("task")["value"]
    assert ea.sort_index().equals(kz.sort_index())


@pytest.mark.parametrize("name", AVERAGE_TABLES)
def test_average_tables_have_no_task_rows(name):
    df = seed_scores(name)
    assert set(df["task"]) == {"average"}
    assert not math.isnan(df["value"].sum())


def test_seed_win_loss_counts_printed_deltas():
    """KnormPress at 0.25: ten positive deltas, and 0.0 on niah_s1, niah_s2, niah_s3."""
    counts = seed_win_loss("knorm_tasks").set_index("compression_ratio")
    assert counts.loc[0.25, ["wins", "losses", "ties"]].tolist() == [10, 0, 3]
    assert counts.loc[0.75, ["wins", "losses", "ties"]].tolist() == [10, 3, 0]  # niah_mk2, niah_mk3, vt
    offline = seed_win_loss("knorm_tasks", tasks=[t for t in SEED_TASK_LABELS.values() if not t.startswith("qa")])
    assert offline.set_index("compression_ratio").loc[0.25, "wins"] == 8  # qa_1, qa_2 were wins
