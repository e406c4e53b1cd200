"""Task-specific baselines: prompt-free network, one dataset, equal share of the universal budget."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from duplus.errors import ConfigError, DataError, ModelError
from duplus.model import DuPLUS, TaskSpecificNet, load_model
from duplus.model.task_specific import ARCHITECTURE
from duplus.train.baseline import baseline_settings, baseline_steps, run_baseline


def test_budget_is_the_universal_steps_shared_among_datasets(config):
    config["pretrain"]["steps"] = 10
    assert baseline_steps(config, 2) == 5
    assert baseline_steps(config, 3) == 3
    config["baseline"] = {"steps": 4}
    assert baseline_steps(config, 2) == 4
    settings = baseline_settings(config, 2)
    assert settings.steps == 4 and settings.warmup_steps <= 3 and settings.dataset_weights is None
    assert settings.lr == config["pretrain"]["lr"]  # the universal run's step size by default
    config["baseline"] = {"steps": 4, "lr": 0.02}
    assert baseline_settings(config, 2).lr == 0.02
    config["baseline"] = {"lr": 0}
    with pytest.raises(ConfigError, match="baseline.lr"):
        baseline_settings(config, 2)
    config["baseline"] = {"steps": 0}
    with pytest.raises(ConfigError, match="baseline.steps"):
        baseline_steps(config, 2)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    from .conftest import BASE_CONFIG, FakePromptCache

    folder = tmp_path_factory.mktemp("baseline")
    config = copy.deepcopy(BASE_CONFIG)
    config["pretrain"]["steps"] = 8  # two datasets: 4 steps each
    sidecar = run_baseline(config, list(store.values()), FakePromptCache(), "toy_ct",
                           folder / "model.safetensors", folder / "train_log.csv")
    return folder, sidecar


def test_baseline_trains_on_its_dataset_only_with_a_fixed_head(trained):
    folder, sidecar = trained
    assert sidecar["architecture"] == ARCHITECTURE
    assert sidecar["datasets"] == ["toy_ct"] and sidecar["steps"] == 4
    assert sidecar["head_classes"] == ["liver", "liver tumor", "spleen"]
    log = pd.read_csv(folder / "train_log.csv")
    assert log["step"].iloc[-1] == 4 and (log["loss"] > 0).all()
    model, _ = load_model(folder / "model.safetensors", architectures=(ARCHITECTURE,))
    assert isinstance(model, TaskSpecificNet)
    assert not any(name.startswith(("film", "controller", "text_proj")) for name, _ in model.named_parameters())


def test_baseline_is_refused_where_prompts_are_needed(trained):
    folder, _ = trained
    with pytest.raises(ModelError, match="task_specific"):
        load_model(folder / "model.safetensors")


def test_baseline_ignores_prompts_but_not_the_class_count(trained):
    folder, _ = trained
    model, _ = load_model(folder / "model.safetensors", architectures=(ARCHITECTURE,))
    image = torch.randn(1, 1, 16, 16, 16)
    modality = torch.zeros(1, dtype=torch.long)
    dim = model.cfg.text_dim
    with torch.no_grad():
        a = model(image, modality, torch.randn(1, dim), torch.randn(3, dim))
        b = model(image, modality, torch.randn(1, dim), torch.randn(3, dim))
    assert a.shape == (1, 3, 16, 16, 16)
    assert torch.equal(a, b)
    with pytest.raises(ModelError, match="3 classes"):
        model(image, modality, None, torch.randn(2, dim))


def test_same_backbone_as_the_universal_network(trained):
    folder, _ = trained
    model, _ = load_model(folder / "model.safetensors", architectures=(ARCHITECTURE,))
    universal = DuPLUS(model.cfg)
    shapes = {n: p.shape for n, p in universal.named_parameters() if n.startswith(("stems", "encoder", "decoder"))}
    mine = {n: p.shape for n, p in model.named_parameters() if n.startswith(("stems", "encoder", "decoder"))}
    assert mine == shapes


def test_unknown_dataset_is_a_clear_error(store, config, tmp_path):
    from .conftest import FakePromptCache

    with pytest.raises(DataError, match="toy_pet"):
        run_baseline(config, list(store.values()), FakePromptCache(), "toy_pet",
                     tmp_path / "model.safetensors", tmp_path / "train_log.csv")
