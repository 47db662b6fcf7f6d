"""Fit KVzap surrogates (per-layer ridge regression and 2-layer MLPs) and measure their held-out fit.

Both models see each layer's attention input ``x (d_model)`` and predict the log KVzip+ score
of each KV head ``(H_kv)``. Inputs and targets are standardised per layer for fitting, and the
standardisation is folded back into the first and last linear maps, so the result is a plain
kvpress ``KVzapModel`` that reads raw hidden states.
"""

from __future__ import annotations

import copy
import math

import pandas as pd
import torch
import torch.nn.functional as F
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from tqdm.auto import tqdm

from mergepress.kvzap.collect import TargetSet

RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _validation_mask(text_index: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Rows whose text falls in a random ``fraction`` of the texts: ``(N,)`` bool."""
    texts = text_index.unique()
    gen = torch.Generator().manual_seed(seed)
    n_val = max(1, round(fraction * len(texts)))
    val_texts = texts[torch.randperm(len(texts), generator=gen)[:n_val]]
    return torch.isin(text_index, val_texts)


def _layer_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over rows of ``x (N, k)``, in float64, std floored at 1e-6."""
    x = x.double()
    return x.mean(0), x.std(0).clamp_min(1e-6)


def _ridge_stats(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sufficient statistics of a ridge fit: ``z (N, d), y (N, o)`` -> ``(z'z, sum z, z'y, sum y, N)`` in float64."""
    return (z.T @ z).double(), z.sum(0).double(), (z.T @ y).double(), y.sum(0).double(), torch.tensor(float(len(z)))


def _ridge_solve(stats: tuple[torch.Tensor, ...], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge fit ``y ~ z @ w + b``, penalty ``alpha * N * |w|^2``, from :func:`_ridge_stats`: ``w (d, o), b (o,)``."""
    zz, sz, zy, sy, n = stats
    zm, ym = sz / n, sy / n
    centred_zz = zz - n * torch.outer(zm, zm)
    centred_zy = zy - n * torch.outer(zm, ym)
    w = torch.linalg.solve(centred_zz + alpha * n * torch.eye(len(zz), dtype=zz.dtype), centred_zy)
    return w, ym - zm @ w


def fit_linear(
    data: TargetSet, val_fraction: float = 0.1, seed: int = 0, progress: bool = True
) -> tuple[KVzapModel, list[float]]:
    """Per-layer ridge regression of log scores on standardised hidden states.

    The ridge strength ``alpha * N`` is chosen per layer among :data:`RIDGE_ALPHAS` on a
    validation split of whole texts, then refitted on all rows (from sufficient statistics, so
    each layer's data is multiplied out once). Returns the model (float32) and the chosen
    ``alpha`` per layer.
    """
    n_layers, n_rows, d_model = data.hidden.shape
    n_out = data.log_scores.shape[-1]
    model = KVzapModel(KVzapConfig(input_dim=d_model, output_dim=n_out, n_modules=n_layers, hidden_dim=None))
    val = _validation_mask(data.text_index, val_fraction, seed)
    alphas = []
    for layer in tqdm(range(n_layers), desc="ridge", unit="layer", disable=not progress):
        x, y = data.hidden[layer].float(), data.log_scores[layer].float()
        mu, sd = _layer_stats(x)
        z = ((x - mu.float()) / sd.float()).contiguous()
        train_stats, val_stats = _ridge_stats(z[~val], y[~val]), _ridge_stats(z[val], y[val])
        all_stats = tuple(a + b for a, b in zip(train_stats, val_stats))
        z_val, y_val = z[val].double(), y[val].double()
        errors = []
        for alpha in RIDGE_ALPHAS:
            w, b = _ridge_solve(train_stats, alpha)
            errors.append(((z_val @ w + b - y_val) ** 2).mean().item())
        alpha = RIDGE_ALPHAS[min(range(len(errors)), key=errors.__getitem__)]
        alphas.append(alpha)
        w, b = _ridge_solve(all_stats, alpha)
        w = w / sd[:, None]  # fold the standardisation back: y = x @ w + b
        b = b - mu @ w
        model.layers[layer].weight.data = w.T.float().contiguous()
        model.layers[layer].bias.data = b.float()
    return model.eval(), alphas


def fit_mlp(
    data: TargetSet,
    hidden_dim: int = 64,
    epochs: int = 20,
    lr: float = 2e-3,
    batch_size: int = 512,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> tuple[KVzapModel, list[dict]]:
    """All layers' 2-layer MLPs (``d_model -> hidden_dim -> GELU -> H_kv``) trained at once.

    AdamW with a cosine learning rate, gradient clipping at 1 and MSE on standardised log
    scores, as KVzap does; the epoch with the lowest loss on a validation split of whole
    texts is kept. Returns the model (float32) and per-epoch ``{"epoch", "train", "val"}``.
    """
    torch.manual_seed(seed)
    n_layers, n_rows, d_model = data.hidden.shape
    n_out = data.log_scores.shape[-1]
    val = _validation_mask(data.text_index, val_fraction, seed)
    train_rows, val_rows = (~val).nonzero().squeeze(1), val.nonzero().squeeze(1)

    stats_x = [_layer_stats(data.hidden[layer, train_rows]) for layer in range(n_layers)]
    stats_y = [_layer_stats(data.log_scores[layer, train_rows]) for layer in range(n_layers)]
    mu_x, sd_x = (torch.stack([s[i] for s in stats_x]).float()[:, None, :] for i in (0, 1))  # (L, 1, d)
    mu_y, sd_y = (torch.stack([s[i] for s in stats_y]).float()[:, None, :] for i in (0, 1))  # (L, 1, o)

    def init(fan_in: int, *shape: int) -> torch.Tensor:
        bound = 1 / math.sqrt(fan_in)
        return torch.empty(*shape).uniform_(-bound, bound).requires_grad_()

    w1, b1 = init(d_model, n_layers, d_model, hidden_dim), init(d_model, n_layers, 1, hidden_dim)
    w2, b2 = init(hidden_dim, n_layers, hidden_dim, n_out), init(hidden_dim, n_layers, 1, n_out)
    params = [w1, b1, w2, b2]

    def batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (data.hidden[:, rows].float() - mu_x) / sd_x  # (L, b, d)
        y = (data.log_scores[:, rows] - mu_y) / sd_y  # (L, b, o)
        return x, y

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(b2, F.gelu(torch.baddbmm(b1, x, w1)), w2)

    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    history, best, best_state = [], math.inf, None
    bar = tqdm(range(epochs), desc=f"MLP d={hidden_dim}", unit="epoch", disable=not progress)
    for epoch in bar:
        order = train_rows[torch.randperm(len(train_rows))]
        total = 0.0
        for i in range(steps_per_epoch):
            x, y = batch(order[i * batch_size : (i + 1) * batch_size])
            loss = F.mse_loss(forward(x), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * x.shape[1]
        with torch.no_grad():
            val_loss = sum(
                F.mse_loss(forward(x), y, reduction="sum").item()
                for x, y in (batch(val_rows[j : j + 4096]) for j in range(0, len(val_rows), 4096))
            ) / (len(val_rows) * n_layers * n_out)
        history.append({"epoch": epoch + 1, "train": total / len(train_rows), "val": val_loss})
        bar.set_postfix(train=f"{history[-1]['train']:.4f}", val=f"{val_loss:.4f}")
        if val_loss < best:
            best, best_state = val_loss, [p.detach().clone() for p in params]
    w1, b1, w2, b2 = best_state

    # Fold the standardisation: x -> (x - mu_x) / sd_x before w1, y = out * sd_y + mu_y after w2.
    w1f = w1 / sd_x.transpose(1, 2)  # (L, d, h)
    b1f = b1 - torch.bmm(mu_x / sd_x, w1)  # (L, 1, h)
    w2f, b2f = w2 * sd_y, b2 * sd_y + mu_y
    model = KVzapModel(KVzapConfig(input_dim=d_model, output_dim=n_out, n_modules=n_layers, hidden_dim=hidden_dim))
    for layer, seq in enumerate(model.layers):
        seq[0].weight.data = w1f[layer].T.contiguous()
        seq[0].bias.data = b1f[layer, 0].contiguous()
        seq[2].weight.data = w2f[layer].T.contiguous()
        seq[2].bias.data = b2f[layer, 0].contiguous()
    return model.eval(), history


@torch.no_grad()
def predict(kvzap_model: KVzapModel, hidden: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Surrogate predictions for ``hidden (n_layers, N, d_model)`` -> ``(n_layers, N, H_kv)`` float32."""
    out = []
    for layer, module in enumerate(kvzap_model.layers):
        module = copy.deepcopy(module).float()  # never change the caller's model
        out.append(torch.cat([module(hidden[layer, i : i + chunk].float()) for i in range(0, hidden.shape[1], chunk)]))
    return torch.stack(out)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 0 (ties broken by order; scores are continuous)."""
    r = torch.empty_like(x)
    r.scatter_(0, x.argsort(dim=0), torch.arange(len(x), dtype=x.dtype)[:, None].expand_as(x).contiguous())
    return r


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


def fit_report(pred: torch.Tensor, true: torch.Tensor) -> pd.DataFrame:
    """Held-out fit per layer, each metric averaged over KV heads.

    ``pred, true (n_layers, N, H_kv)`` -> columns ``layer, r2, pearson, spearman, rmse``.
    """
    rows = []
    for layer in range(true.shape[0]):
        p, t = pred[layer].double(), true[layer].double()
        r2 = 1 - ((p - t) ** 2).sum(0) / ((t - t.mean(0)) ** 2).sum(0)
        rows.append(
            {
                "layer": layer,
                "r2": r2.mean().item(),
                "pearson": _pearson(p, t).mean().item(),
                "spearman": _pearson(_ranks(p), _ranks(t)).mean().item(),
                "rmse": ((p - t) ** 2).mean().sqrt().item(),
            }
        )
    return pd.DataFrame(rows)
