"""Fixtures for training tests: a tiny synthetic preprocessed store, manifests and a prompt cache."""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

PATCH = [16, 16, 16]

# Two datasets with overlapping but different class sets, so partial labels matter.
DATASETS = {
    "toy_ct": {"modality": "CT", "sequence": None, "region": "abdomen",
               "labels": {"1": "liver", "2": "liver tumor", "3": "spleen"}, "centers": ["siteA", "siteB"]},
    "toy_mr": {"modality": "MRI", "sequence": "T2", "region": "abdomen",
               "labels": {"1": "liver", "2": "right kidney"}, "centers": ["siteC"]},
}
SHAPES = [(24, 24, 24), (20, 24, 28), (12, 24, 24)]  # the last is thinner than a 16^3 patch


def _blob(shape, centre, radius):
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


def _write_case(root: Path, dataset: str, case: str, shape, labels: dict, rng, radius_scale: float = 1.0) -> dict:
    """One preprocessed case: a ball per class (radius 3 voxels for label 1, else 2, times ``radius_scale``)."""
    folder = root / dataset / case
    folder.mkdir(parents=True)
    label = np.zeros(shape, dtype=np.uint8)
    for label_id in sorted(int(k) for k in labels):
        centre = [int(rng.integers(3, s - 3)) for s in shape]
        label[_blob(shape, centre, (2 + (label_id == 1)) * radius_scale)] = label_id
    image = (rng.normal(size=shape) * 0.1 + label).astype(np.float32)
    np.save(folder / "image.npy", image)
    np.save(folder / "label.npy", label)
    locations = {str(i): np.argwhere(label == i).astype(np.int32) for i in np.unique(label) if i}
    np.savez(folder / "locations.npz", **locations)
    (folder / "meta.json").write_text("{}")
    return {"image": f"{case}/image.npy", "label": f"{case}/label.npy", "meta": f"{case}/meta.json",
            "locations": f"{case}/locations.npz", "shape": "x".join(map(str, shape))}


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> dict[str, Path]:
    """Manifests of a synthetic store: dataset -> manifest path."""
    root = tmp_path_factory.mktemp("preprocessed")
    rng = np.random.default_rng(7)
    manifests = {}
    for name, spec in DATASETS.items():
        rows = []
        number = 0
        for center in spec["centers"]:
            for i in range(4):
                case = f"{name}_{number:03d}"
                number += 1
                paths = _write_case(root, name, case, SHAPES[number % len(SHAPES)], spec["labels"], rng)
                rows.append({"dataset": name, "case": case, "center": center, "modality": spec["modality"],
                             "sequence": spec["sequence"] or "", "region": spec["region"],
                             "split": "test" if i == 3 else "train", **paths,
                             "labels": json.dumps(spec["labels"]), "raw_image": "", "raw_label": ""})
        manifest = root / name / "manifest.csv"
        pd.DataFrame(rows).to_csv(manifest, index=False)
        manifests[name] = manifest
    return manifests


def _install_fallbacks() -> None:
    """Stand-ins for sibling packages that are not in the tree yet (unused once they are)."""
    try:
        templates = importlib.import_module("duplus.prompts.templates")
    except ImportError:
        templates = None
    if templates is None or not hasattr(templates, "target_prompts"):
        import sys
        import types

        module = types.ModuleType("duplus.prompts.templates")
        names = {"CT": "computed tomography scan", "MRI": "magnetic resonance imaging scan",
                 "PET": "positron emission tomography scan"}

        def context_prompt(modality, region, sequence=None):
            return f"A {names[modality]} of the {region}"

        def target_prompts(modality, class_name, sequence=None):
            mod = names[modality]
            return [f"A {mod} of a {class_name}.", f"There is {class_name} in this {mod}.",
                    f"{class_name} observed in {mod} imaging.", f"{mod} revealing a {class_name}.",
                    f"Identification of a {class_name} through {mod}."]

        module.context_prompt, module.target_prompts = context_prompt, target_prompts
        sys.modules["duplus.prompts.templates"] = module
    model_pkg = importlib.import_module("duplus.model")
    if not hasattr(model_pkg, "modality_index"):
        model_pkg.modality_index = lambda name: ("CT", "MRI", "PET").index(name)


_install_fallbacks()


class FakePromptCache:
    """In-memory prompt cache: a deterministic vector per text; records every lookup."""

    def __init__(self, dim: int = 12, identity: str = "fake-encoder") -> None:
        self.dim = dim
        self.encoder_identity = identity
        self.lookups = 0

    def get(self, text: str) -> torch.Tensor:
        self.lookups += 1
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        return torch.from_numpy(np.random.default_rng(seed).normal(size=self.dim).astype(np.float32))

    def get_many(self, texts) -> torch.Tensor:
        return torch.stack([self.get(t) for t in texts]) if texts else torch.zeros(0, self.dim)


@pytest.fixture
def prompt_cache() -> FakePromptCache:
    return FakePromptCache()


BASE_CONFIG = {
    "seed": 3,
    "device": "cpu",
    "prompts": {"paraphrases": True},
    "model": {"preset": "tiny", "overrides": {}},
    "pretrain": {"steps": 10, "batch_size": 2, "patch_size": PATCH, "lr": 0.002, "weight_decay": 3e-5,
                 "warmup_steps": 2, "ema_decay": 0.9, "grad_accum": 1, "amp": "auto", "checkpoint_every": 3,
                 "log_every": 2, "num_workers": 0, "foreground_ratio": 0.67, "dataset_weights": {},
                 "exclude_centers": {"toy_ct": ["siteB"]}, "compile": False},
    "inference": {"overlap": 0.25, "sw_batch_size": 2, "blend": "gaussian", "threshold": 0.5},
    "evaluate": {"split": "test", "nsd_tolerance_mm": 4.0, "max_cases_per_dataset": 0},
    "lora": {"centers": {"ct_siteB": {"dataset": "toy_ct", "center": "siteB"}}, "rank": 2, "alpha": 4,
             "dropout": 0.0, "targets": ["encoder", "decoder", "film", "controller"], "text_projection": False,
             "modules_to_save": [], "steps": 3, "batch_size": 2, "lr": 0.003, "full_finetune_lr": 0.0005},
}


@pytest.fixture
def config() -> dict:
    return copy.deepcopy(BASE_CONFIG)
