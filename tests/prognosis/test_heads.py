"""MLP_Prog training: deterministic, learns a real signal, gives proper survival curves."""

from __future__ import annotations

import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored

from duplus.prognosis.heads import MLPSettings, SurvivalMLP

from .fakes import synthetic_cohort


def data(n: int = 240):
    cohort = synthetic_cohort(n, seed=3, ehr_effect=0.0, image_effect=1.5)
    return cohort.image, cohort.time, cohort.event


@pytest.mark.learning
def test_deterministic_and_learns_the_signal():
    """400 patients, 2/3 to train: the true risk orders the test third with C 0.805.

    Held-out C over MLP seeds 0-7 (5 here): 0.707-0.800, the same to the last digit under
    ATEN_CPU_CAPABILITY=default and =avx2 with 1 and 2 threads (AMD EPYC, AVX2). With 240 patients
    (160 to train, as before) it was 0.62-0.73 over seeds 0-3: the old bound of 0.7 sat inside that.
    """
    X, time, event = data(400)
    train, test = np.arange(267), np.arange(267, 400)
    settings = MLPSettings(epochs=60, hidden=16, seed=5)
    a = SurvivalMLP(settings).fit(X[train], time[train], event[train])
    b = SurvivalMLP(settings).fit(X[train], time[train], event[train])
    np.testing.assert_array_equal(a.predict_risk(X[test]), b.predict_risk(X[test]))
    c_index = concordance_index_censored(event[test], time[test], a.predict_risk(X[test]))[0]
    assert c_index > 0.65
    assert 1 <= a.best_epoch_ <= 60


def test_survival_curves_are_monotone_probabilities():
    X, time, event = data()
    times = np.linspace(0, time.max() * 1.5, 25)
    for survival in ("discrete", "breslow"):
        mlp = SurvivalMLP(MLPSettings(epochs=30, hidden=8, survival=survival)).fit(X, time, event)
        surv = mlp.predict_survival(X[:20], times)
        assert surv.shape == (20, 25)
        assert np.all((surv >= 0) & (surv <= 1))
        assert np.all(np.diff(surv, axis=1) <= 1e-9)
        # Higher risk, lower survival (strictly so for the proportional-hazards Breslow curves).
        order = np.argsort(mlp.predict_risk(X[:20]))
        if survival == "breslow":
            assert np.all(np.diff(surv[order, 12]) <= 1e-12)


def test_tiny_training_set_skips_the_inner_split():
    X, time, event = data()
    mlp = SurvivalMLP(MLPSettings(epochs=5, hidden=4)).fit(X[:8], time[:8], event[:8])
    assert mlp.best_epoch_ == 5 and np.isfinite(mlp.predict_risk(X)).all()


def test_an_input_constant_in_training_cannot_move_the_risk():
    X, time, event = data()
    X = X[:120].copy()
    X[:, 3] = 2.0                                     # no spread in training
    mlp = SurvivalMLP(MLPSettings(epochs=20, hidden=8)).fit(X, time[:120], event[:120])
    new = X[:5].copy()
    shifted = new.copy()
    shifted[:, 3] = [-50.0, 0.0, 7.0, 300.0, 1e4]
    np.testing.assert_array_equal(mlp.predict_risk(new), mlp.predict_risk(shifted))
    np.testing.assert_array_equal(mlp.predict_survival(new, [1.0, 5.0]), mlp.predict_survival(shifted, [1.0, 5.0]))


def test_defaults_are_the_config_schema_defaults():
    # A caller without a config (a notebook, `SurvivalMLP()`) trains the network the pipeline trains.
    from pathlib import Path

    import yaml

    schema = yaml.safe_load((Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml").read_text())
    prognosis = schema["properties"]["prognosis"]["properties"]
    defaults = MLPSettings()
    for key in ("hidden", "epochs", "lr", "time_bins"):
        assert getattr(defaults, key) == prognosis[key]["default"], key
    assert MLPSettings.from_config({}) == defaults


def test_film_starts_from_the_unconditioned_network():
    import torch

    from duplus.prognosis.heads import MLPProg

    torch.manual_seed(0)
    net = MLPProg(in_dim=5, hidden=8, n_bins=3, condition_dim=2).eval()
    x = torch.randn(4, 5)
    moved = x.clone()
    moved[:, -2:] += 3.0                          # only the condition changes
    for a, b in zip(net(x), net(moved)):
        torch.testing.assert_close(a, b)          # gamma = beta = 0 at the start


def interaction(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Risk = image feature x (+1 or -1 by a coded record field): no main effect of either input."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, 3))
    field = rng.integers(0, 2, size=n)
    log_hazard = 1.5 * image[:, 0] * (2 * field - 1)
    event_time = rng.exponential(np.exp(-log_hazard))
    censor = rng.exponential(2.0, size=n)
    X = np.column_stack([image, np.eye(2)[field]])
    return X, np.minimum(event_time, censor), event_time <= censor


@pytest.mark.learning
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_film_conditioning_lets_the_record_steer_the_image_features(seed):
    """The record field flips the sign of the image effect; only through the FiLM condition can
    the held-out risk follow it. Held-out Harrell's C measured for seeds 0 / 1 / 2
    (ATEN_CPU_CAPABILITY=default and =avx2 within 0.001): with the FiLM condition 0.72 / 0.80 / 0.83
    (concatenated instead: the same within 0.002), image alone 0.51 / 0.40 / 0.48."""
    X, time, event = interaction(400, seed)
    train, test = np.arange(300), np.arange(300, 400)
    settings = MLPSettings(epochs=200, hidden=16, seed=seed)
    film = SurvivalMLP(settings, condition_dim=2).fit(X[train], time[train], event[train])
    alone = SurvivalMLP(settings).fit(X[train, :3], time[train], event[train])
    c_film = concordance_index_censored(event[test], time[test], film.predict_risk(X[test]))[0]
    c_alone = concordance_index_censored(event[test], time[test], alone.predict_risk(X[test, :3]))[0]
    assert c_film > 0.68 and c_alone < 0.58
