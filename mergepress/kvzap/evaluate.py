"""The ``calibrate`` and ``compare`` commands: KVzap thresholds and KVzap vs KnormPress on RULER.

Both read a RULER suite and prefill each context once with the sweep engine
(:func:`mergepress.sweep.capture_prefill`); presses are then replayed on the captured layer
inputs through their own ``forward_hook`` (:func:`mergepress.sweep.apply_press`).

* ``calibrate`` takes the first ``--per-task`` samples of each task, scores every context token
  with each surrogate, and finds the thresholds at which ``DMSPress(KVzapPress(...))`` reaches
  the target compression ratios (DMSPress's rule: a token outside the 128-token window is
  evicted when its score is below the threshold; the ratio is the evicted share of
  (layer, head, token) entries, averaged over layers, then over samples). The rule is checked
  against ``DMSPress.compression_ratio`` itself at the fixed thresholds.
* ``compare`` takes the *next* ``--per-task`` samples (unseen by the calibration) and, for
  KnormPress and KVzap at one compression ratio (and DMSPress(KVzap) at its calibrated
  threshold, with and without MergingPress), measures the achieved ratio, the per-layer error of
  the attention output of the question tokens against the uncompressed cache, the greedy answer
  (RULER string match) and the answer's negative log-likelihood.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from kvpress import DMSPress, KnormPress, KVPressTextGenerationPipeline
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from mergepress.kvzap.press import KVzapPress
from mergepress.kvzap.surrogate import MODEL_TYPES, shipped_thresholds
from mergepress.kvzap.targets import _apply_rope
from mergepress.models import load_model
from mergepress.press import MergingPress
from mergepress.ruler import load_jsonl
from mergepress.sweep.engine import (
    LayerInputs,
    Prompt,
    achieved_ratio,
    answer_and_nll,
    apply_press,
    capture_prefill,
    tokenize,
)
from mergepress.sweep.run import reference_text, sample_score

WINDOW = 128  # DMSPress's default sliding window


def _samples(path: str, per_task: int, skip: int, tasks: str | None = None) -> pd.DataFrame:
    """Samples ``skip .. skip + per_task - 1`` of every task (or of ``tasks``, comma-separated) in ``path``."""
    suite = load_jsonl(path)
    if tasks:
        suite = suite[suite["task"].isin(tasks.split(","))]
    parts = [g.iloc[skip : skip + per_task] for _, g in suite.groupby("task", sort=False)]
    df = pd.concat(parts).reset_index(drop=True)
    if df.empty:
        raise ValueError(f"{path} has no samples {skip}..{skip + per_task - 1} in any task")
    return df


def _kvzap(model_type: str, weights: str | None, **kwargs: float) -> KVzapPress:
    path = None if weights is None else str(Path(weights) / f"{model_type}.safetensors")
    return KVzapPress(model_type=model_type, weights=path, **kwargs)


@torch.no_grad()
def surrogate_scores(press: KVzapPress, captured: list[LayerInputs]) -> torch.Tensor:
    """``press.score`` on every captured layer: ``(n_layers, H_kv, L)`` float32 (batch 1)."""
    rows = [
        press.score(c.module, c.kwargs["hidden_states"], c.keys, c.values, None, c.kwargs)[0].float() for c in captured
    ]
    return torch.stack(rows)


def dms_ratio(scores: torch.Tensor, threshold: float, window: int = WINDOW) -> float:
    """DMSPress's compression ratio for ``scores (n_layers, H, L)`` at ``threshold`` (prefill only)."""
    n_layers, n_heads, length = scores.shape
    if length <= window:
        return 0.0
    evicted = (scores[..., : length - window] < threshold).sum(dim=(1, 2)).double()
    return float((evicted / (n_heads * length)).mean())


def solve_threshold(scores: list[torch.Tensor], target: float, window: int = WINDOW) -> float:
    """The threshold whose mean DMS ratio over ``scores`` is ``target`` (bisection; ratios are monotone)."""
    lo = min(float(s.min()) for s in scores) - 1
    hi = max(float(s.max()) for s in scores) + 1
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(dms_ratio(s, mid, window) for s in scores) / len(scores) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _write(df: pd.DataFrame, out: str | Path, command: str, note: str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    out.with_suffix(".md").write_text(f"# {out.name}\n\nCommand: `{command}`\n\n{note}\n")
    return out


def calibrate(args: argparse.Namespace, command: str) -> None:
    """Thresholds for target ratios, per surrogate; see the module docstring."""
    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    suite = _samples(args.data, args.per_task, skip=0, tasks=args.tasks)
    targets = [float(x) for x in args.targets.split(",") if x]
    fixed = [float(x) for x in args.fixed.split(",") if x]
    scorers = {t: _kvzap(t, args.weights) for t in MODEL_TYPES}
    for press in scorers.values():
        press.post_init_from_model(model)
    scores: dict[str, list[torch.Tensor]] = {t: [] for t in MODEL_TYPES}
    checks = []
    start = time.time()
    for row in tqdm(suite.itertuples(), total=len(suite), desc="calibrate", disable=args.no_progress):
        prompt = tokenize(pipe, row.context, row.question, row.answer_prefix, "")
        captured = capture_prefill(model, prompt.context_ids)
        for t, scorer in scorers.items():
            s = surrogate_scores(scorer, captured)
            scores[t].append(s)
            for threshold in fixed:  # the rule must match DMSPress's own count
                dms = DMSPress(_kvzap(t, args.weights), threshold=threshold)
                apply_press(model, dms, captured)
                checks.append((t, threshold, dms.compression_ratio, dms_ratio(s, threshold)))
        del captured
    bad = [c for c in checks if abs(c[2] - c[3]) > 1e-9]
    if bad:
        raise RuntimeError(f"the DMS rule disagrees with DMSPress.compression_ratio: {bad[:3]}")

    rows = []
    for t in MODEL_TYPES:
        for kind, values in (("target", targets), ("fixed", fixed)):
            for value in values:
                threshold = round(solve_threshold(scores[t], value), 3) if kind == "target" else value
                ratios = [dms_ratio(s, threshold) for s in scores[t]]
                rows.append(
                    {
                        "model_type": t,
                        "kind": kind,
                        "target_ratio": value if kind == "target" else math.nan,
                        "threshold": threshold,
                        "ratio_mean": round(sum(ratios) / len(ratios), 4),
                        "ratio_min": round(min(ratios), 4),
                        "ratio_max": round(max(ratios), 4),
                        "n_samples": len(ratios),
                        # a target above the window's cap (1 - 128 / L) cannot be reached
                        "reached": kind == "fixed" or abs(sum(ratios) / len(ratios) - value) < 0.01,
                    }
                )
    table = pd.DataFrame(rows)
    note = (
        f"Calibration samples: the first {args.per_task} of each task of {args.data} "
        f"({len(suite)} contexts, {suite['task'].nunique()} tasks), sliding window {WINDOW}. "
        f"ratio_* is DMSPress's compression ratio per sample (checked equal to DMSPress.compression_ratio "
        f"at thresholds {fixed} on every sample). {time.time() - start:.0f} s."
    )
    out = _write(table, args.out, command, note)
    print(table.to_string(index=False))
    print(f"\nwrote {out}")
    if args.manifest:
        manifest_path = Path(args.manifest)
        manifest = json.loads(manifest_path.read_text())
        targets_only = table.kind == "target"
        manifest["thresholds"] = {
            t: {f"{r.target_ratio:g}": r.threshold for r in table[(table.model_type == t) & targets_only].itertuples()}
            for t in MODEL_TYPES
        }
        manifest["thresholds_note"] = note + f" Command: {command}"
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"recorded the thresholds in {manifest_path}")
        card = manifest_path.parent / "MODEL_CARD.md"
        if card.exists():
            _update_card(card, table, note, command)
            print(f"and in {card}")


def _update_card(card: Path, table: pd.DataFrame, note: str, command: str) -> None:
    """Replace the thresholds section of a model card written by ``train``."""
    from mergepress.kvzap.pipeline import THRESHOLDS_BEGIN, THRESHOLDS_END

    text = card.read_text()
    if THRESHOLDS_BEGIN not in text or THRESHOLDS_END not in text:
        return
    cols = ["model_type", "kind", "target_ratio", "threshold", "ratio_mean", "ratio_min", "ratio_max", "n_samples"]
    body = "\n".join(
        [
            "Compression ratio of `DMSPress(KVzapPress(model_type=...), threshold=t)` (sliding window 128):",
            "",
            table[cols].astype(object).where(table[cols].notna(), "").to_markdown(index=False, floatfmt=".4g"),
            "",
            note,
            "",
            f"Command: `{command}`. Read them with `mergepress.kvzap.shipped_thresholds(model.config, model_type)`.",
        ]
    )
    head, rest = text.split(THRESHOLDS_BEGIN, 1)
    card.write_text(head + THRESHOLDS_BEGIN + "\n" + body + "\n" + THRESHOLDS_END + rest.split(THRESHOLDS_END, 1)[1])


# --- compare ----------------------------------------------------------------------------------


@torch.no_grad()
def question_inputs(model: PreTrainedModel, captured: list[LayerInputs], prompt: Prompt) -> list[dict]:
    """Per layer, the question tokens' post-RoPE queries ``q (1, H, Q, D)`` and their own keys and
    values ``(1, H_kv, Q, D)``, from a forward of the question over the uncompressed context."""
    cache = apply_press(model, None, captured)
    out: list[dict] = [{} for _ in captured]
    n_q = prompt.question_ids.shape[1]

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        from kvpress.utils import get_prerope_query_states

        cos, sin = kwargs["position_embeddings"]
        q = _apply_rope(get_prerope_query_states(module, kwargs["hidden_states"]), cos, sin)
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        out[module.layer_idx] = {"q": q, "k": layer.keys[:, :, -n_q:].clone(), "v": layer.values[:, :, -n_q:].clone()}

    handles = [c.module.register_forward_hook(hook, with_kwargs=True) for c in captured]
    try:
        model.model(input_ids=prompt.question_ids, past_key_values=cache)
    finally:
        for h in handles:
            h.remove()
    return out


def attention_output(
    module: nn.Module, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_masked_ctx: torch.Tensor | None
) -> torch.Tensor:
    """``o_proj`` of causal attention of the question queries over ``[context; question]`` keys.

    ``q (1, H, Q, D)``, ``keys, values (1, H_kv, C + Q, D)`` with the question's own last;
    ``n_masked_ctx (1, H_kv, C)`` bool marks context keys a mask-based press hid. Returns ``(Q, d_model)``.
    """
    n_heads, n_q = q.shape[1], q.shape[2]
    groups = n_heads // keys.shape[1]
    k, v = keys.repeat_interleave(groups, 1).float(), values.repeat_interleave(groups, 1).float()
    logits = torch.matmul(q.float(), k.transpose(-1, -2)) * getattr(module, "scaling", module.head_dim**-0.5)
    n_ctx = keys.shape[2] - n_q
    causal = torch.ones(n_q, n_q, dtype=torch.bool).triu(1)
    logits[..., n_ctx:] = logits[..., n_ctx:].masked_fill(causal, -math.inf)
    if n_masked_ctx is not None:
        hide = n_masked_ctx.repeat_interleave(groups, 1)[:, :, None, :]  # (1, H, 1, C)
        logits[..., :n_ctx] = logits[..., :n_ctx].masked_fill(hide, -math.inf)
    out = torch.matmul(logits.softmax(-1), v)  # (1, H, Q, D)
    out = out.transpose(1, 2).reshape(n_q, -1)
    return module.o_proj(out.to(module.o_proj.weight.dtype)).float()


def _configs(ratio: float, thresholds: dict[str, float], weights: str | None) -> dict[str, Callable[[], object]]:
    """Configuration name -> press factory (``no_press`` gives None)."""
    out = {"no_press": lambda: None, f"knorm@{ratio}": lambda: KnormPress(ratio)}
    for t in MODEL_TYPES:
        out[f"kvzap_{t}@{ratio}"] = lambda t=t: _kvzap(t, weights, compression_ratio=ratio)
    for t in MODEL_TYPES:
        if t in thresholds:
            th = thresholds[t]
            out[f"dms_kvzap_{t}@{th}"] = lambda t=t, th=th: DMSPress(_kvzap(t, weights), threshold=th)
    if "mlp" in thresholds:
        th = thresholds["mlp"]
        out[f"merging_dms_kvzap_mlp@{th}"] = lambda th=th: MergingPress(DMSPress(_kvzap("mlp", weights), threshold=th))
    return out


def _thresholds(args: argparse.Namespace, model: PreTrainedModel) -> dict[str, float]:
    key = f"{args.ratio:g}"
    if args.thresholds and args.thresholds.endswith(".json"):
        table = json.loads(Path(args.thresholds).read_text()).get("thresholds", {})
        return {t: float(v[key]) for t, v in table.items() if key in v}
    if args.thresholds:
        return {k: float(v) for k, v in (kv.split("=") for kv in args.thresholds.split(","))}
    if args.weights:
        manifest = str(Path(args.weights) / "manifest.json")
        return _thresholds(argparse.Namespace(**{**vars(args), "thresholds": manifest}), model)
    return {t: float(v[key]) for t in MODEL_TYPES if key in (v := shipped_thresholds(model.config, t))}


def compare(args: argparse.Namespace, command: str) -> None:
    """KVzap vs KnormPress at one ratio; see the module docstring."""
    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    suite = _samples(args.data, args.per_task, skip=args.skip, tasks=args.tasks)
    thresholds = _thresholds(args, model)
    configs = _configs(args.ratio, thresholds, args.weights)
    rows, layer_rows = [], []
    start = time.time()
    bar = tqdm(total=len(suite) * len(configs), desc="compare", disable=args.no_progress)
    for sample in suite.itertuples():
        answers = [str(a) for a in sample.answer]
        reference_answer = reference_text(answers, sample.answer_prefix)
        prompt = tokenize(pipe, sample.context, sample.question, sample.answer_prefix, reference_answer)
        captured = capture_prefill(model, prompt.context_ids)
        n_ctx = prompt.context_ids.shape[1]
        questions = question_inputs(model, captured, prompt)
        reference = [
            attention_output(c.module, q["q"], torch.cat([c.keys, q["k"]], 2), torch.cat([c.values, q["v"]], 2), None)
            for c, q in zip(captured, questions)
        ]
        for name, make in configs.items():
            press = make()
            cache = apply_press(model, press, captured)
            ratio = achieved_ratio(model, cache, n_ctx)
            errors = []
            for c, qi, ref in zip(captured, questions, reference):
                layer = cache.layers[c.module.layer_idx]
                masked = getattr(c.module, "masked_key_indices", None)
                hide = None
                if masked is not None:
                    hide = torch.zeros(layer.keys.shape[:3], dtype=torch.bool)
                    hide[masked[0], masked[1], masked[2]] = True
                keys, values = torch.cat([layer.keys, qi["k"]], 2), torch.cat([layer.values, qi["v"]], 2)
                err = (attention_output(c.module, qi["q"], keys, values, hide) - ref).norm() / ref.norm()
                errors.append(float(err))
                layer_rows.append({"config": name, "layer": c.module.layer_idx, "rel_error": float(err)})
            dms = press.press if isinstance(press, MergingPress) else press
            budget = 0 if args.no_generate else int(sample.max_new_tokens)
            answer, nll = answer_and_nll(pipe, press, cache, prompt, budget)
            rows.append(
                {
                    "task": sample.task,
                    "index": int(sample.index),
                    "config": name,
                    "achieved_ratio": round(ratio, 4),
                    "dms_ratio": round(dms.compression_ratio, 4) if isinstance(dms, DMSPress) else math.nan,
                    "output_rel_error": round(sum(errors) / len(errors), 5),
                    "score": math.nan if args.no_generate else sample_score(sample.task, answer, answers),
                    "answer_nll": round(nll, 4),
                    "predicted_answer": answer,
                }
            )
            bar.update()
        del captured
    bar.close()
    df = pd.DataFrame(rows)
    summary = (
        df.groupby("config", sort=False)
        .agg(
            achieved_ratio=("achieved_ratio", "mean"),
            output_rel_error=("output_rel_error", "mean"),
            ruler_score=("score", "mean"),
            answer_nll=("answer_nll", "mean"),
            n=("score", "size"),
        )
        .round(4)
        .reset_index()
    )
    note = (
        f"Samples {args.skip}..{args.skip + args.per_task - 1} of each task of {args.data} ({len(suite)} contexts; "
        f"the calibration uses the first {args.skip}), ratio {args.ratio}, DMS thresholds {thresholds}. "
        f"output_rel_error: ||O_press - O_full|| / ||O_full|| of the attention output (after o_proj) of the "
        f"question tokens, per layer against the uncompressed cache, averaged over layers then samples. "
        f"ruler_score: RULER string match of the greedy answer (0-100). answer_nll: mean NLL of the reference answer. "
        f"{time.time() - start:.0f} s.\n\n" + summary.to_markdown(index=False, floatfmt=".4g")
    )
    out = _write(df, args.out, command, note)
    summary.to_csv(out.with_name(out.stem + ".summary.csv"), index=False)
    pd.DataFrame(layer_rows).groupby(["config", "layer"], sort=False)["rel_error"].mean().reset_index().to_csv(
        out.with_name(out.stem + ".layers.csv"), index=False
    )
    print(summary.to_string(index=False))
    print(f"\nwrote {out} (+ .summary.csv, .layers.csv, .md)")
