"""Cox partial likelihood (Breslow / Efron) against hand values, a loop reference and sksurv's
maximum-likelihood fit; the logistic-hazard loss and time bins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from duplus.prognosis.survival_losses import (
    cox_ph_loss,
    discretize,
    logistic_hazard_loss,
    make_time_bins,
    survival_from_hazard_logits,
)


def reference_loss(risk, time, event, ties):
    """Textbook partial likelihood, one distinct event time at a time (plain loops)."""
    loglik, n_events = 0.0, int(event.sum())
    for t in np.unique(time[event == 1]):
        tied = (time == t) & (event == 1)
        at_risk = time >= t
        d = int(tied.sum())
        R = np.exp(risk[at_risk]).sum()
        D = np.exp(risk[tied]).sum()
        loglik += risk[tied].sum()
        for k in range(d):
            loglik -= math.log(R - (k / d) * D) if ties == "efron" else math.log(R)
    return -loglik / n_events


def test_hand_computed_value_with_ties():
    risk = torch.tensor([0.0, math.log(2), 0.0, math.log(3)], dtype=torch.float64)
    time = torch.tensor([1.0, 2.0, 2.0, 3.0])
    event = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # t=1: all at risk (1+2+1+3 = 7); t=2: two tied events, risk set 2+1+3 = 6, tied share 3.
    breslow = (math.log(7) - math.log(2) + 2 * math.log(6)) / 3
    efron = (math.log(7) - math.log(2) + math.log(6) + math.log(4.5)) / 3
    assert float(cox_ph_loss(risk, time, event, ties="breslow")) == pytest.approx(breslow, abs=1e-12)
    assert float(cox_ph_loss(risk, time, event, ties="efron")) == pytest.approx(efron, abs=1e-12)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_matches_loop_reference_on_many_ties(ties):
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 60
        risk = rng.normal(scale=2.0, size=n)
        time = rng.integers(1, 8, size=n).astype(float)      # heavy ties
        event = (rng.random(n) < 0.6).astype(float)
        got = cox_ph_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event), ties=ties)
        assert float(got) == pytest.approx(reference_loss(risk, time, event, ties), rel=1e-10)


def test_stable_for_large_risks_and_order_invariant():
    risk = torch.tensor([800.0, -800.0, 5.0, 799.0, 0.0], dtype=torch.float64, requires_grad=True)
    time = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0])
    event = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    loss = cox_ph_loss(risk, time, event)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(risk.grad).all()
    perm = torch.tensor([4, 2, 0, 3, 1])
    shuffled = cox_ph_loss(risk[perm], time[perm], event[perm]).detach()
    assert float(shuffled) == pytest.approx(float(loss.detach()))


def test_no_event_gives_zero_with_gradient():
    risk = torch.randn(4, requires_grad=True)
    loss = cox_ph_loss(risk, torch.arange(4.0), torch.zeros(4))
    loss.backward()
    assert float(loss.detach()) == 0.0 and risk.grad is not None


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_minimiser_is_sksurv_cox_fit(ties):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(150, 3))
    time = np.ceil(rng.exponential(np.exp(-X @ np.array([0.8, -0.5, 0.0]))) * 4)   # ties
    event = rng.random(150) < 0.7
    beta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")
    Xt, tt, et = torch.tensor(X), torch.tensor(time), torch.tensor(event, dtype=torch.float64)

    def closure():
        optimizer.zero_grad()
        loss = cox_ph_loss(Xt @ beta, tt, et, ties=ties)
        loss.backward()
        return loss

    optimizer.step(closure)
    reference = CoxPHSurvivalAnalysis(alpha=0, ties=ties, tol=1e-12).fit(X, Surv.from_arrays(event, time))
    np.testing.assert_allclose(beta.detach().numpy(), reference.coef_, atol=1e-5)


def test_time_bins_and_discretize():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0])
    event = np.array([1, 1, 1, 1, 0, 1, 1, 0], dtype=bool)
    edges = make_time_bins(time, event, 3)
    assert edges[0] == 0 and edges[-1] == 10 and np.all(np.diff(edges) > 0) and len(edges) == 4
    idx, through = discretize(np.array([0.0, edges[1], edges[1] + 1e-6, 99.0]), np.array([1, 1, 0, 0], bool), edges)
    assert idx.tolist() == [0, 0, 1, 2]
    assert through.tolist() == [True, True, False, True]   # censored right after an edge: before mid-bin


def test_logistic_hazard_hand_value_and_survival():
    logits = torch.zeros(2, 4)                               # hazard 1/2 everywhere: each term log 2
    loss = logistic_hazard_loss(logits, torch.tensor([2, 1]), torch.tensor([1.0, 0.0]),
                                torch.tensor([True, False]))
    # patient 1: survives bins 0, 1 and has the event in 2 (3 terms); patient 2: survives bin 0 only.
    assert float(loss) == pytest.approx(4 * math.log(2) / 2)
    np.testing.assert_allclose(survival_from_hazard_logits(logits)[0].numpy(), [0.5, 0.25, 0.125, 0.0625])
