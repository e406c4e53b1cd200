"""MLP_Prog: a small survival MLP with a Cox risk head and a discrete-time (logistic hazard) head,
and the estimator that trains it with early stopping on an inner validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from duplus.prognosis.survival_losses import (
    cox_ph_loss,
    discretize,
    logistic_hazard_loss,
    make_time_bins,
    survival_from_hazard_logits,
)
from duplus.settings import Settings, schema_default


@dataclass(frozen=True)
class MLPSettings:
    """Training settings of MLP_Prog (config ``prognosis``: epochs, lr, hidden, time_bins)."""

    # The config schema's defaults (prognosis.hidden, epochs, lr, time_bins), for callers without a config.
    hidden: int = schema_default("prognosis", "hidden")
    epochs: int = schema_default("prognosis", "epochs")
    lr: float = float(schema_default("prognosis", "lr"))
    weight_decay: float = 1e-3
    dropout: float = 0.1
    time_bins: int = schema_default("prognosis", "time_bins")
    val_fraction: float = 0.2
    patience: int | None = None      # epochs without validation improvement; None = max(10, epochs // 5)
    ties: str = "efron"
    discrete_weight: float = 1.0     # weight of the logistic-hazard loss beside the Cox loss
    survival: str = "discrete"       # survival curves from the "discrete" head or "breslow"
    seed: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "MLPSettings":
        settings = Settings.of(config)
        prog = settings.prognosis
        values = dict(hidden=prog.hidden, epochs=prog.epochs, lr=prog.lr, time_bins=prog.time_bins, seed=settings.seed)
        values.update(overrides)
        return cls(**values)


class MLPProg(nn.Module):
    """Shared trunk plus linear paths -> (Cox log-risk (N,), hazard logits per time bin (N, B)).

    With ``condition_dim`` > 0 the last ``condition_dim`` inputs do not enter the trunk: they
    condition it through FiLM (the first hidden layer h becomes h * (1 + gamma(c)) + beta(c)), the
    mechanism by which DuPLUS's context prompt steers the image features. gamma and beta start at
    zero, so training starts from the unconditioned network.
    """

    def __init__(self, in_dim: int, hidden: int, n_bins: int, dropout: float = 0.1, condition_dim: int = 0) -> None:
        super().__init__()
        if not 0 <= condition_dim < in_dim:
            raise ValueError(f"MLP_Prog: condition_dim {condition_dim} must leave inputs to condition (in_dim {in_dim})")
        self.condition_dim = condition_dim
        main_dim = in_dim - condition_dim
        self.trunk = nn.Sequential(nn.Linear(main_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                   nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.film = nn.Linear(condition_dim, 2 * hidden) if condition_dim else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.risk = nn.Linear(hidden, 1)
        self.hazard = nn.Linear(hidden, n_bins)
        # Linear paths beside the trunk: on a small cohort the model can stay close to a Cox /
        # logistic-hazard linear model and use the trunk only for what a linear term misses.
        self.risk_linear = nn.Linear(main_dim, 1, bias=False)
        self.hazard_linear = nn.Linear(main_dim, n_bins, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.film is None:
            h = self.trunk(x)
        else:
            x, condition = x[:, : -self.condition_dim], x[:, -self.condition_dim:]
            gamma, beta = self.film(condition).chunk(2, dim=-1)
            h = self.trunk[1:](self.trunk[0](x) * (1 + gamma) + beta)
        return (self.risk(h) + self.risk_linear(x)).squeeze(-1), self.hazard(h) + self.hazard_linear(x)


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


class SurvivalMLP:
    """Fit MLP_Prog on one training fold; predict risks and survival curves for new rows.

    Inputs are z-scored with the training rows' statistics (an input constant over them is 0 for
    every row). Training is full-batch Adam (the Cox partial likelihood compares each event with
    its whole risk set), stopped early on the loss of an inner, event-stratified validation split;
    the best epoch's weights are kept. Everything random draws from ``settings.seed``, so a refit
    gives the same numbers.

    Example:
        >>> mlp = SurvivalMLP(MLPSettings(epochs=50)).fit(X_train, t_train, e_train)
        >>> risk = mlp.predict_risk(X_test); surv = mlp.predict_survival(X_test, times)
    """

    def __init__(self, settings: MLPSettings = MLPSettings(), condition_dim: int = 0) -> None:
        self.settings = settings
        self.condition_dim = condition_dim     # trailing inputs that condition the rest (FiLM)

    def fit(self, X: np.ndarray, time: np.ndarray, event: np.ndarray) -> "SurvivalMLP":
        s = self.settings
        X = np.array(X, dtype=np.float64)
        # Copies: fields of a structured survival array are strided views torch cannot wrap.
        time = np.array(time, dtype=float)
        event = np.array(event, dtype=bool)
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.std_ = np.where(std > 1e-8, std, 1.0)
        # An input without spread in training leaves its weights untrained: 0 for every row, so a
        # new row's differing value cannot reach them.
        self.varies_ = std > 1e-8
        self.edges_ = make_time_bins(time, event, s.time_bins)
        fit_idx, val_idx = self._inner_split(event)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            net = MLPProg(X.shape[1], s.hidden, len(self.edges_) - 1, s.dropout, self.condition_dim)
            optimizer = torch.optim.Adam(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
            train = self._tensors(X[fit_idx], time[fit_idx], event[fit_idx])
            val = self._tensors(X[val_idx], time[val_idx], event[val_idx]) if len(val_idx) else None
            patience = s.patience if s.patience is not None else max(10, s.epochs // 5)
            best_loss, best_state, since_best = float("inf"), _snapshot(net), 0
            self.best_epoch_ = s.epochs
            for epoch in range(s.epochs):
                net.train()
                optimizer.zero_grad()
                loss = self._loss(net, train)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"MLP_Prog: training loss became {float(loss)} at epoch {epoch + 1}; "
                                       f"lower prognosis.lr")
                loss.backward()
                optimizer.step()
                if val is None:
                    continue
                net.eval()
                with torch.no_grad():
                    val_loss = float(self._loss(net, val))
                if val_loss < best_loss - 1e-6:
                    best_loss, best_state, since_best = val_loss, _snapshot(net), 0
                    self.best_epoch_ = epoch + 1
                else:
                    since_best += 1
                    if since_best >= patience:
                        break
            if val is not None:
                net.load_state_dict(best_state)
        net.eval()
        self.net_ = net
        if s.survival == "breslow":
            from sksurv.linear_model.coxph import BreslowEstimator

            self.breslow_ = BreslowEstimator().fit(self._forward(X)[0], event, time)
        return self

    def predict_risk(self, X: np.ndarray) -> np.ndarray:
        """Log hazard ratio per row (higher = earlier event)."""
        return self._forward(X)[0]

    def predict_survival(self, X: np.ndarray, times: np.ndarray) -> np.ndarray:
        """S(t | x) at ``times`` for each row, shape (N, len(times))."""
        times = np.asarray(times, dtype=float)
        risk, logits = self._forward(X)
        if self.settings.survival == "breslow":
            return np.stack([fn(np.clip(times, fn.domain[0], fn.domain[1]))
                             for fn in self.breslow_.get_survival_function(risk)])
        surv = survival_from_hazard_logits(torch.as_tensor(logits)).numpy()
        # Piecewise-linear between bin edges, S(0) = 1, flat after the last edge.
        grid = self.edges_
        full = np.concatenate([np.ones((len(surv), 1)), surv], axis=1)
        return np.stack([np.interp(times, grid, row) for row in full])

    def _forward(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(self._scale(X), dtype=torch.float32)
        with torch.no_grad():
            risk, logits = self.net_(x)
        return risk.double().numpy(), logits.double().numpy()

    def _scale(self, X: np.ndarray) -> np.ndarray:
        return np.where(self.varies_, (np.asarray(X, dtype=np.float64) - self.mean_) / self.std_, 0.0)

    def _inner_split(self, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(event)
        idx = np.arange(n)
        n_val = int(round(self.settings.val_fraction * n))
        # Both outcomes must appear at least twice, or a stratified split is impossible and the
        # validation loss meaningless: then train on everything for all epochs.
        if n_val < 4 or min(event.sum(), (~event).sum()) < 2 or event.sum() < 4:
            return idx, idx[:0]
        fit_idx, val_idx = train_test_split(idx, test_size=n_val, stratify=event,
                                            random_state=self.settings.seed)
        return np.sort(fit_idx), np.sort(val_idx)

    def _tensors(self, X: np.ndarray, time: np.ndarray, event: np.ndarray) -> dict[str, torch.Tensor]:
        bin_index, through = discretize(time, event, self.edges_)
        return {"x": torch.as_tensor(self._scale(X), dtype=torch.float32),
                "time": torch.as_tensor(time, dtype=torch.float32),
                "event": torch.as_tensor(event, dtype=torch.float32),
                "bin": torch.as_tensor(bin_index), "through": torch.as_tensor(through)}

    def _loss(self, net: MLPProg, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        risk, logits = net(batch["x"])
        loss = cox_ph_loss(risk, batch["time"], batch["event"], ties=self.settings.ties)
        if self.settings.discrete_weight:
            loss = loss + self.settings.discrete_weight * logistic_hazard_loss(
                logits, batch["bin"], batch["event"], batch["through"])
        return loss
