"""The sweep engine: same answers as kvpress's pipeline, resumable, shardable, robust to bad input."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from kvpress import KVPressTextGenerationPipeline
from transformers import GPT2Config, GPT2LMHeadModel

from mergepress.ruler import generate
from mergepress.sweep import Config, build_press, registry, run_sweep
from mergepress.sweep import run as run_module
from mergepress.sweep.__main__ import main as cli
from mergepress.sweep.engine import check_model
from mergepress.sweep.store import read_results

NEW_TOKENS = 8
SETTINGS = {"test": True}


@pytest.fixture(scope="module")
def suite(smollm2):
    _, tokenizer = smollm2
    return generate("niah_single_1", 3, 640, tokenizer, seed=7)


def escaped(answer: str) -> str:
    return answer.replace("\r", "\\r").replace("\n", "\\n")


# DMS configurations take a score threshold: KVzap's log-scores near the shipped threshold for a
# 0.5 ratio, Knorm's -||k|| where this short context loses about half its entries.
DMS_VALUES = {"dms_kvzap_mlp": -4.0, "dms_knorm": -18.5}


def test_engine_matches_the_kvpress_pipeline(smollm2, suite, tmp_path):
    model, tokenizer = smollm2
    configs = []
    for name in registry():
        base = name.removeprefix("upstream_merging_").removeprefix("merging_")
        configs.append(Config(name, 0.0 if name == "no_press" else DMS_VALUES.get(base, 0.5)))
    out = run_sweep(model, tokenizer, suite, configs, tmp_path / "eq.csv", SETTINGS, NEW_TOKENS, progress=False)
    rows = read_results(out)
    assert (rows["status"] == "ok").all() and len(rows) == len(configs) * len(suite)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    for config in configs:
        for sample in suite.itertuples():
            press = build_press(config.name, config.value)
            with torch.no_grad():
                expected = pipe(
                    sample.context,
                    question=sample.question,
                    answer_prefix=sample.answer_prefix,
                    press=press,
                    max_new_tokens=NEW_TOKENS,
                )["answer"]
            got = rows[(rows["config"] == config.name) & (rows["index"] == sample.index)]["predicted_answer"].item()
            assert got == escaped(expected), (config, sample.index)
    knorm = rows[rows["config"] == "knorm"]["compression_ratio"]
    assert knorm.between(0.49, 0.51).all()
    for name in DMS_VALUES:  # thresholds that really compress, so DMS is not trivially no_press
        assert rows[rows["config"] == name]["compression_ratio"].between(0.2, 0.8).all(), name


def test_resume_skips_finished_pairs_and_repairs_a_killed_file(smollm2, suite, tmp_path):
    model, tokenizer = smollm2
    out = tmp_path / "missing" / "folder" / "r.csv"  # the folder is created
    configs = [Config("knorm", 0.5), Config("merging_knorm", 0.5)]
    run_sweep(model, tokenizer, suite.iloc[:2], configs, out, SETTINGS, 4, progress=False)
    first = out.read_text()
    assert len(read_results(out)) == 4
    # A run killed mid-row leaves a partial last line; the next run cuts it and adds nothing twice.
    with open(out, "a") as f:
        f.write("niah_single_1,2,knorm,0.5,,ok,0.5, 12")
    run_sweep(model, tokenizer, suite, configs, out, SETTINGS, 4, progress=False)
    rows = read_results(out)
    assert len(rows) == 6 and out.read_text().startswith(first)
    assert not rows.duplicated(["task", "index", "config", "value"]).any()
    mtime = out.stat().st_mtime_ns
    run_sweep(model, tokenizer, suite, configs, out, SETTINGS, 4, progress=False)
    assert out.stat().st_mtime_ns == mtime, "a finished sweep must not be rewritten"
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(model, tokenizer, suite, configs, out, {"test": "other"}, 4, progress=False)


def test_part_files_of_a_killed_sharded_run_are_folded_in(smollm2, suite, tmp_path, monkeypatch):
    model, tokenizer = smollm2
    configs = [Config("knorm", 0.5)]
    done = run_sweep(model, tokenizer, suite.iloc[:2], configs, tmp_path / "k.csv", SETTINGS, 4, progress=False)
    out = tmp_path / "r.csv"
    run_sweep(model, tokenizer, suite.iloc[:0], configs, out, SETTINGS, 4, progress=False)  # empty file + sidecar
    done.rename(tmp_path / "r.part1-of-2.csv")  # as a killed 2-process run leaves it

    def no_prefill(*args):
        raise AssertionError("a row of the part file was computed again")

    monkeypatch.setattr(run_module, "capture_prefill", no_prefill)
    # a time budget of 0 folds the parts in and starts no sample, though the third is not done
    run_sweep(model, tokenizer, suite, configs, out, SETTINGS, 4, progress=False, max_seconds=0)
    assert len(read_results(out)) == 2 and not list(tmp_path.glob("r.part*"))


def test_out_of_memory_is_recorded_and_the_sweep_continues(smollm2, suite, tmp_path, monkeypatch):
    model, tokenizer = smollm2
    real = run_module.capture_prefill
    calls = []

    def flaky(model, ids):
        calls.append(ids.shape)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(model, ids)

    monkeypatch.setattr(run_module, "capture_prefill", flaky)
    out = run_sweep(model, tokenizer, suite.iloc[:2], [Config("knorm", 0.5)], tmp_path / "o.csv", SETTINGS, 4)
    rows = read_results(out)
    assert rows["status"].tolist()[0].startswith("failed: OutOfMemoryError: CUDA out of memory")
    assert rows["status"].tolist()[1] == "ok"


def test_samples_are_visited_round_robin_over_tasks(smollm2, tmp_path):
    # A sweep stopped early must cover every task, not finish the first tasks and skip the rest.
    model, tokenizer = smollm2
    two = pd.concat([generate(t, 2, 640, tokenizer, seed=3) for t in ("niah_single_1", "vt")], ignore_index=True)
    out = run_sweep(model, tokenizer, two, [Config("no_press")], tmp_path / "r.csv", SETTINGS, 1, progress=False)
    rows = read_results(out)
    assert list(zip(rows["task"], rows["index"])) == [
        ("niah_single_1", 0),
        ("vt", 0),
        ("niah_single_1", 1),
        ("vt", 1),
    ]


def test_bad_input():
    with pytest.raises(ValueError, match="registry holds: no_press, knorm"):
        build_press("knrom", 0.5)
    with pytest.raises(ValueError, match="merging_"):
        build_press("knorm", 0.5, {"merge_fraction": 0.5})
    with pytest.raises(SystemExit, match="unknown configuration"):
        cli(["--presses", "knrom", "--out", "/tmp/never.csv"])
    with pytest.raises(SystemExit):
        cli(["--max-minutes", "-1", "--out", "/tmp/never.csv"])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="kvpress does not support GPT2LMHeadModel; supported models: Llama"):
        check_model(gpt2)


def test_two_accelerate_processes_give_the_same_results(smollm2, tmp_path):
    """Shard samples over 2 CPU processes with accelerate; compare with one process."""
    args = [
        "--length", "640", "--n", "2", "--tasks", "niah_single_1,niah_single_2", "--seed", "3",
        "--presses", "knorm,merging_knorm", "--ratios", "0.5", "--max-new-tokens", "4",
        "--data", str(tmp_path / "suite.jsonl"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = tmp_path / "one.csv"
    subprocess.run([sys.executable, "-m", "mergepress.sweep", *args, "--out", str(one)], check=True, env=env)
    two = tmp_path / "two.csv"
    # accelerate's multi-process launcher (torchrun underneath); on a CPU-only machine the two
    # processes form a gloo group. (`--cpu` alone would start a single process.)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mergepress.sweep"]
    run = subprocess.run([*launch, *args, "--out", str(two)], check=True, env=env, capture_output=True, text=True)
    # each rank labels its progress bar: both must have run, each on its own share of the samples
    assert "sweep [0]" in run.stderr and "sweep [1]" in run.stderr, run.stderr[-2000:]
    columns = ["task", "index", "config", "value", "status", "compression_ratio", "predicted_answer", "score"]
    a, b = read_results(one)[columns], read_results(two)[columns]
    assert len(a) == 8 and not list(tmp_path.glob("two.part*"))
    pd.testing.assert_frame_equal(a, b)
    torch.testing.assert_close(
        torch.tensor(read_results(one)["answer_nll"].values), torch.tensor(read_results(two)["answer_nll"].values)
    )
