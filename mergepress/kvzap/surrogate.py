"""Save, load and find KVzap surrogate weights (kvpress ``KVzapModel``) without the hub.

A weights file is a safetensors file holding the ``KVzapModel`` state dict (``layers.{i}.weight``
and ``layers.{i}.bias`` for the linear model, ``layers.{i}.0.*`` and ``layers.{i}.2.*`` for the
MLP) and, in its string metadata, a format tag, the ``KVzapConfig`` shapes, the fingerprint of
the language model it was trained for, a SHA-256 of the tensor bytes and free-form training
information. Loading checks all of these and names the file in every error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig

FORMAT = "mergepress-kvzap/1"
MODEL_TYPES = ("linear", "mlp")
WEIGHTS_DIR = Path(__file__).parent / "weights"
FINGERPRINT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)


class KVzapWeightsError(ValueError):
    """A KVzap weights file exists but is unreadable, incomplete, corrupt or for another model."""


def model_fingerprint(config: PretrainedConfig) -> dict:
    """What identifies a language model's shape: architecture plus the sizes in :data:`FINGERPRINT_KEYS`.

    Two checkpoints of one architecture (e.g. base and instruct) share a fingerprint; the
    surrogate would then load for both, which is what a user of the embedded model expects.
    """
    config = getattr(config, "text_config", config)
    fp: dict = {"architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0]}
    for key in FINGERPRINT_KEYS:
        value = getattr(config, key, None)
        if key == "head_dim" and value is None:
            value = config.hidden_size // config.num_attention_heads
        fp[key] = value
    return fp


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_surrogate(
    kvzap_model: KVzapModel,
    path: str | Path,
    fingerprint: dict,
    info: dict | None = None,
) -> Path:
    """Write ``kvzap_model`` (in its own dtype, bit for bit) to ``path`` (a ``.safetensors`` file).

    ``fingerprint`` is :func:`model_fingerprint` of the language model it was trained on;
    ``info`` (JSON-serialisable) is stored as-is, e.g. training data and held-out fit.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = kvzap_model.config
    tensors = {k: v.detach().cpu().contiguous() for k, v in kvzap_model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model_type": "linear" if cfg.hidden_dim is None else "mlp",
        "config": json.dumps(
            {k: getattr(cfg, k) for k in ("input_dim", "output_dim", "hidden_dim", "n_modules")}, sort_keys=True
        ),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "sha256": _digest(tensors),
        "info": json.dumps(info or {}, sort_keys=True),
    }
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors creates its files readable by the owner only
    tmp.rename(path)
    return path


def read_metadata(path: str | Path) -> dict:
    """The decoded metadata of a weights file (``config``, ``fingerprint`` and ``info`` as dicts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KVzap weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise KVzapWeightsError(f"KVzap weights file {path} is not a readable safetensors file: {err}") from err
    if raw.get("format") != FORMAT:
        raise KVzapWeightsError(f"KVzap weights file {path} has format {raw.get('format')!r}, expected {FORMAT!r}")
    try:
        meta = dict(raw)
        for key in ("config", "fingerprint", "info"):
            meta[key] = json.loads(raw[key])
    except (KeyError, json.JSONDecodeError) as err:
        raise KVzapWeightsError(f"KVzap weights file {path} has incomplete metadata: {err!r}") from err
    return meta


def load_surrogate(path: str | Path, fingerprint: dict | None = None) -> KVzapModel:
    """Load a ``KVzapModel`` saved by :func:`save_surrogate`, in the dtype it was saved in.

    Raises ``FileNotFoundError`` if ``path`` does not exist and :class:`KVzapWeightsError` if it
    is not a valid file (truncated, wrong format, checksum or shape mismatch) or, when
    ``fingerprint`` is given, was trained for another model. Every message names the file.
    """
    path = Path(path)
    meta = read_metadata(path)
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        diff = {k: (meta["fingerprint"].get(k), v) for k, v in fingerprint.items() if meta["fingerprint"].get(k) != v}
        raise KVzapWeightsError(
            f"KVzap weights file {path} was trained for another model; (file, model) differ in {diff}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise KVzapWeightsError(f"KVzap weights file {path} is corrupt: {err}") from err
    if _digest(tensors) != meta["sha256"]:
        raise KVzapWeightsError(f"KVzap weights file {path} is corrupt: its tensors do not match their SHA-256")
    try:
        model = KVzapModel(KVzapConfig(**meta["config"]))
        model.load_state_dict(tensors, strict=True, assign=True)
    except (RuntimeError, TypeError) as err:
        raise KVzapWeightsError(f"KVzap weights file {path} does not fit its declared shapes: {err}") from err
    return model.eval()


def _manifests() -> list[tuple[Path, dict]]:
    """``(folder, manifest)`` for every ``weights/<name>/manifest.json``."""
    out = []
    for path in sorted(WEIGHTS_DIR.glob("*/manifest.json")):
        try:
            out.append((path.parent, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError) as err:
            raise KVzapWeightsError(f"KVzap manifest {path} is unreadable: {err}") from err
    return out


def shipped_manifest(config: PretrainedConfig) -> tuple[Path, dict] | None:
    """``(folder, manifest)`` of the shipped surrogates trained for a model with ``config``'s fingerprint."""
    target = model_fingerprint(config)
    for folder, manifest in _manifests():
        if manifest.get("fingerprint") == target:
            return folder, manifest
    return None


def shipped_weights(config: PretrainedConfig, model_type: str) -> Path | None:
    """Path of the shipped ``model_type`` surrogate for a model with ``config``'s fingerprint, or None.

    Matching goes through ``weights/<name>/manifest.json``, not through the weights file, so
    a missing or corrupt shipped file is reported by :func:`load_surrogate` under its own name.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    found = shipped_manifest(config)
    if found is None:
        return None
    folder, manifest = found
    return folder / manifest["files"][model_type]


def shipped_thresholds(config: PretrainedConfig, model_type: str) -> dict[str, float]:
    """Calibrated DMSPress thresholds of the shipped ``model_type`` surrogate, ``{"0.5": t, ...}``
    (target compression ratio on 2048-token RULER -> threshold); empty if none were shipped."""
    found = shipped_manifest(config)
    return {} if found is None else dict(found[1].get("thresholds", {}).get(model_type, {}))
