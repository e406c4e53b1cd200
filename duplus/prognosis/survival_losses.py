"""Survival losses in torch: Cox partial likelihood (Breslow / Efron ties) and the logistic-hazard
negative log-likelihood of a discrete-time head, plus the time discretisation it needs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str = "efron") -> torch.Tensor:
    """Negative Cox partial log-likelihood, averaged over events.

    Args:
        risk: log hazard ratios, shape (N,) or (N, 1).
        time: follow-up times (N,).
        event: 1 for an event, 0 for censoring (N,).
        ties: "efron" (exact for tied events up to a second-order term) or "breslow".

    Returns:
        A scalar; 0 (still attached to the graph) when there is no event, because then the
        partial likelihood carries no information.

    Computed in log space: the risk-set sum is a reverse cumulative logsumexp, and Efron's
    correction uses the ratio (tied events' share of the risk set) which lies in (0, 1], so large
    risks neither overflow nor underflow.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    risk = risk.reshape(-1)
    dtype = torch.float64 if risk.dtype == torch.float64 else torch.float32
    risk = risk.to(dtype)
    time = time.reshape(-1).to(risk.device, dtype)
    event = event.reshape(-1).to(risk.device, dtype)
    n_events = event.sum()
    if n_events.item() == 0:
        return risk.sum() * 0.0

    order = torch.argsort(time, descending=True, stable=True)
    r, t, e = risk[order], time[order], event[order]
    # Group k = one distinct time; in descending order its risk set is everything up to the
    # group's last member.
    _, group, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    log_risk_set = torch.logcumsumexp(r, 0)[last]                       # (K,)
    n_groups = counts.numel()
    d = torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(0, group, e)
    event_risk = torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(0, group, e * r)
    loglik = event_risk.sum()
    if ties == "breslow":
        loglik = loglik - (d * log_risk_set).sum()
    else:
        share = torch.zeros(n_groups, dtype=dtype, device=r.device).index_add_(
            0, group, e * torch.exp(r - log_risk_set[group]))
        has = d > 0
        d_k, share_k, log_rs = d[has], share[has], log_risk_set[has]
        steps = torch.arange(int(d_k.max().item()), dtype=dtype, device=r.device)   # l = 0..max d - 1
        frac = steps[None, :] / d_k[:, None]
        valid = steps[None, :] < d_k[:, None]
        # log(R - l/d * D) = log R + log(1 - l/d * D/R); padding entries (l >= d) are zeroed
        # before the log so that neither the value nor its gradient sees log(0).
        removed = torch.where(valid, frac * share_k[:, None], torch.zeros_like(frac))
        loglik = loglik - (d_k * log_rs).sum() - torch.log1p(-removed).sum()
    return -loglik / n_events


def make_time_bins(time: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin edges [0, c_1, ..., c_n] at quantiles of the (training) event times.

    Quantile cuts put about as many events in each bin, so every hazard is estimable; the last
    edge is the largest follow-up so that every training time falls in a bin.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    source = time[event] if event.sum() >= n_bins else time
    inner = np.quantile(source, np.linspace(0, 1, n_bins + 1)[1:-1]) if source.size else np.array([])
    edges = np.unique(np.concatenate([[0.0], inner, [max(float(time.max()), 1e-9)]]))
    edges = edges[edges > 0]
    return np.concatenate([[0.0], edges])


def discretize(time: np.ndarray, event: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin index of each time (bin j covers (edges[j], edges[j+1]]) and whether the patient is at
    risk through its own bin: events are; a censored patient is when censored past the bin's
    midpoint (the life-table half-interval rule), otherwise only through the previous bins.
    """
    time = np.asarray(time, dtype=float)
    n_bins = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, time, side="left") - 1, 0, n_bins - 1)
    midpoint = (edges[idx] + edges[idx + 1]) / 2
    through = np.asarray(event, dtype=bool) | (time >= midpoint)
    return idx.astype(np.int64), through


def logistic_hazard_loss(logits: torch.Tensor, bin_index: torch.Tensor, event: torch.Tensor,
                         through: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the discrete-time (logistic hazard) model, mean over patients.

    Args:
        logits: hazard logits per bin (N, B).
        bin_index: bin of each patient's time (N,).
        event: 1 for an event (N,).
        through: whether the patient's own bin counts (see ``discretize``).
    """
    n, n_bins = logits.shape
    bins = torch.arange(n_bins, device=logits.device)[None, :]
    idx = bin_index.reshape(-1, 1).to(logits.device)
    target = ((bins == idx) & (event.reshape(-1, 1).to(logits.device) > 0)).to(logits.dtype)
    mask = (bins < idx) | ((bins == idx) & through.reshape(-1, 1).to(logits.device).bool())
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * mask).sum() / max(n, 1)


def survival_from_hazard_logits(logits: torch.Tensor) -> torch.Tensor:
    """S at each bin's right edge: prod over bins so far of (1 - hazard). Shape (N, B)."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1))
