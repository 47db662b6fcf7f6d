"""Collect (hidden state, log KVzip+ score) pairs for every layer over a corpus of texts."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergepress.kvzap.data import Text
from mergepress.kvzap.targets import collect_targets, repeat_prompt


@dataclass
class TargetSet:
    """Features and targets of one split.

    ``hidden (n_layers, N, d_model)`` float16 (attention inputs), ``log_scores (n_layers, N, H_kv)``
    float32, ``text_index (N,)`` int64: which text of the corpus each row comes from.
    """

    hidden: torch.Tensor
    log_scores: torch.Tensor
    text_index: torch.Tensor


@dataclass
class Dataset:
    """Train and held-out :class:`TargetSet` plus what produced them (``meta``: texts, split, timing)."""

    train: TargetSet
    test: TargetSet
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write with ``torch.save`` (via a temporary file, so an interrupted save never looks finished)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        torch.save({"train": vars(self.train), "test": vars(self.test), "meta": self.meta}, tmp)
        tmp.rename(path)

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        """Read a file written by :meth:`save`."""
        d = torch.load(Path(path), weights_only=True)
        return cls(TargetSet(**d["train"]), TargetSet(**d["test"]), d["meta"])


def processing_order(texts: list[Text]) -> list[int]:
    """Indices of ``texts`` with the held-out texts spread evenly among the train texts, so a
    partial collection (see ``shard_dir``) already has both splits."""
    train = [i for i, t in enumerate(texts) if t.split == "train"]
    test = [i for i, t in enumerate(texts) if t.split != "train"]
    keyed = [((k + 0.5) / max(len(train), 1), i) for k, i in enumerate(train)]
    keyed += [((k + 0.5) / max(len(test), 1), i) for k, i in enumerate(test)]
    return [i for _, i in sorted(keyed)]


def collect_dataset(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[Text],
    tokens_per_text: int = 0,
    seed: int = 0,
    chunk_size: int = 256,
    shard_dir: str | Path | None = None,
    progress: bool = True,
) -> Dataset:
    """Run every text through the repeat prompt and keep its features and KVzip+ targets.

    Train texts keep ``tokens_per_text`` random context tokens each (all if 0, the default);
    held-out texts keep every token, so held-out correlations cover whole texts. With
    ``shard_dir`` each text's result is written there as it is computed and reused by a later
    call (a collection can be interrupted and resumed; ``meta["collect_seconds"]`` then only
    counts the texts computed by this call, ``meta["shard_seconds"]`` all of them, and
    ``meta["shard_cpu_seconds"]`` their CPU time over all threads).
    """
    shards = Path(shard_dir) if shard_dir is not None else None
    if shards is not None:
        shards.mkdir(parents=True, exist_ok=True)
    results: dict[int, tuple[torch.Tensor, torch.Tensor, float, int, float]] = {}
    start = time.time()
    computed = n_tokens = 0
    bar = tqdm(processing_order(texts), desc="KVzip+ targets", unit="text", disable=not progress)
    for i in bar:
        t = texts[i]
        shard = shards / f"{i:05d}.pt" if shards is not None else None
        if shard is not None and shard.exists():
            d = torch.load(shard, weights_only=True)
            results[i] = (
                d["hidden"],
                d["log_scores"],
                d["seconds"],
                d["prompt_tokens"],
                d.get("cpu_seconds", math.nan),
            )
            continue
        t0, cpu0 = time.time(), time.process_time()
        prompt = repeat_prompt(tokenizer, t.text)
        hidden, scores = collect_targets(model, prompt, chunk_size=chunk_size)
        n = hidden.shape[1]
        if t.split == "train" and 0 < tokens_per_text < n:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            keep = torch.randperm(n, generator=gen)[:tokens_per_text].sort().values
            hidden, scores = hidden[:, keep], scores[:, keep]
        cpu = time.process_time() - cpu0  # all threads: on an idle machine wall time is about cpu / threads
        results[i] = (hidden.half(), scores.float(), time.time() - t0, prompt.input_ids.shape[1], cpu)
        if shard is not None:
            tmp = shard.with_name(shard.name + ".partial")
            torch.save(dict(zip(("hidden", "log_scores", "seconds", "prompt_tokens", "cpu_seconds"), results[i])), tmp)
            tmp.rename(shard)
        computed += 1
        n_tokens += prompt.input_ids.shape[1]
        bar.set_postfix(tokens=n_tokens, s_per_text=f"{(time.time() - start) / computed:.1f}")

    def stack(split: str) -> TargetSet:
        idx = [i for i in range(len(texts)) if texts[i].split == split]
        if not idx:
            raise ValueError(f"the {split} split has no texts")
        return TargetSet(
            torch.cat([results[i][0] for i in idx], dim=1),
            torch.cat([results[i][1] for i in idx], dim=1),
            torch.cat([torch.full((results[i][0].shape[1],), i) for i in idx]),
        )

    meta = {
        "texts": [{"source": t.source, "split": t.split} for t in texts],
        "tokens_per_text": tokens_per_text,
        "prompt_tokens": sum(r[3] for r in results.values()),
        "collect_seconds": time.time() - start,
        "shard_seconds": sum(r[2] for r in results.values()),
        "shard_cpu_seconds": sum(r[4] for r in results.values()),
    }
    return Dataset(stack("train"), stack("test"), meta)


def load_shards(texts: list[Text], shard_dir: str | Path) -> Dataset:
    """The texts of a partial collection found in ``shard_dir`` (for inspecting a run in progress)."""
    shard_dir = Path(shard_dir)
    done = sorted(int(p.stem) for p in shard_dir.glob("[0-9]*.pt"))
    sub = [texts[i] for i in done]
    data = {}
    for i in done:
        d = torch.load(shard_dir / f"{i:05d}.pt", weights_only=True)
        data[i] = d
    parts = {}
    for split in ("train", "test"):
        idx = [i for i in done if texts[i].split == split]
        parts[split] = TargetSet(
            torch.cat([data[i]["hidden"] for i in idx], dim=1),
            torch.cat([data[i]["log_scores"] for i in idx], dim=1),
            torch.cat([torch.full((data[i]["hidden"].shape[1],), i) for i in idx]),
        )
    return Dataset(parts["train"], parts["test"], {"texts": [{"source": t.source, "split": t.split} for t in sub]})
