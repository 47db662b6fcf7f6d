"""KVzapPress that loads our offline surrogates instead of the hub's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpress import KVzapPress as _KVzapPress
from transformers import PreTrainedModel

from mergepress.kvzap.surrogate import KVzapWeightsError, load_surrogate, model_fingerprint, shipped_weights


@dataclass
class KVzapPress(_KVzapPress):
    """kvpress's ``KVzapPress`` with offline weights: a drop-in, same ``model_type`` argument.

    ``post_init_from_model`` picks the surrogate in this order:

    1. ``weights``, if given: a file written by :func:`mergepress.kvzap.save_surrogate`
       (e.g. by ``python -m mergepress.kvzap train``); it must have been trained for a model
       with the same fingerprint (architecture and sizes);
    2. the surrogate shipped in ``mergepress/kvzap/weights/`` for a model with this model's
       fingerprint (the embedded SmolLM2-135M);
    3. otherwise kvpress's behaviour: ``nvidia/KVzap-{model_type}-{model name}`` from the hub,
       with a clear error when it cannot be reached.

    Scores are log KVzip+ estimates; use it as ``DMSPress(KVzapPress(), threshold=t)`` (see
    ``shipped_thresholds`` for calibrated ``t``) or as a ScorerPress with ``compression_ratio``.

    Parameters
    ----------
    compression_ratio:
        As for any ScorerPress (ignored under DMSPress, which uses its threshold).
    model_type:
        ``"mlp"`` (default) or ``"linear"``.
    weights:
        Optional path of a surrogate file, overriding the shipped one.
    """

    weights: str | Path | None = None

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        path = Path(self.weights) if self.weights is not None else shipped_weights(model.config, self.model_type)
        if path is None:
            try:
                super().post_init_from_model(model)
            except OSError as err:
                name = f"nvidia/KVzap-{self.model_type}-{model.config.name_or_path.split('/')[-1]}"
                raise KVzapWeightsError(
                    f"no KVzap surrogate is shipped for this model ({model_fingerprint(model.config)}) and {name} "
                    f"could not be loaded from the hub ({type(err).__name__}). Train one offline with "
                    f"`python -m mergepress.kvzap train --model <model> --out DIR` and pass "
                    f"KVzapPress(model_type={self.model_type!r}, weights='DIR/{self.model_type}.safetensors')."
                ) from err
            return
        name = f"file:{path.resolve()}"
        if name != self.kvzap_model_name:
            kvzap_model = load_surrogate(path, fingerprint=model_fingerprint(model.config))
            expected = "linear" if kvzap_model.config.hidden_dim is None else "mlp"
            if expected != self.model_type:
                raise KVzapWeightsError(f"KVzap weights file {path} holds a {expected} model, not {self.model_type!r}")
            self.kvzap_model = kvzap_model
            self.kvzap_model_name = name

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: kvpress's ``score`` reads ``self.kvzap_model``,
        # which exists once ``post_init_from_model`` has run.
        if name == "kvzap_model":
            raise AttributeError(
                "KVzapPress has no surrogate loaded: call press.post_init_from_model(model) first "
                "(`with press(model):` and kvpress's pipeline do it)"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
