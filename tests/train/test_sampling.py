"""Patch sampling: determinism per (seed, step, index), foreground bias, partial labels, loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duplus.data.manifest import read_manifests, select_cases
from duplus.errors import ConfigError, DataError
from duplus.train.cases import dataset_weights, pretraining_cases
from duplus.train.sampling import PatchSampler, collate_patches, extract, make_loader

from .conftest import DATASETS, PATCH


def _sampler(store, config, **kwargs) -> PatchSampler:
    cases = pretraining_cases(config, store.values())
    return PatchSampler(cases, PATCH, **kwargs)


def test_pretraining_cases_keep_train_split_and_drop_excluded_centers(store, config):
    cases = pretraining_cases(config, store.values())
    assert cases and all(c.split == "train" for c in cases)
    assert not [c for c in cases if c.dataset == "toy_ct" and c.center == "siteB"]
    assert {c.dataset for c in cases} == {"toy_ct", "toy_mr"}
    everything = read_manifests(store.values())
    held_out = select_cases(everything, split="test", datasets=["toy_ct"], centers=["siteB"])
    assert [c.center for c in held_out] == ["siteB"]
    config["pretrain"]["exclude_centers"] = {"nope": ["x"]}
    with pytest.raises(ConfigError, match="nope"):
        pretraining_cases(config, store.values())


def test_dataset_weights_normalised_and_validated(config):
    config["pretrain"]["dataset_weights"] = {"a": 3.0}
    assert dataset_weights(config, ["a", "b"]) == [0.75, 0.25]
    config["pretrain"]["dataset_weights"] = {"c": 1.0}
    with pytest.raises(ConfigError, match="dataset_weights"):
        dataset_weights(config, ["a", "b"])


def test_sample_is_pure_function_of_seed_step_index(store, config):
    first = _sampler(store, config)
    second = _sampler(store, config)  # a fresh sampler, as in a resumed job or another worker
    for key in [(0, 5, 1), (1, 0, 0), (2, 9, 3)]:
        a, b = first.sample(*key), second.sample(*key)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
        assert a["case"] == b["case"] and a["target_texts"] == b["target_texts"]
    # Order of calls does not matter, and different keys give different patches.
    late = first.sample(2, 9, 3)
    assert torch.equal(late["image"], second.sample(2, 9, 3)["image"])
    assert not torch.equal(first.sample(0, 5, 1)["image"], first.sample(0, 5, 2)["image"])
    assert not torch.equal(first.sample(0, 5, 1)["image"], first.sample(1, 5, 1)["image"])


def test_sample_shapes_targets_and_texts(store, config):
    sampler = _sampler(store, config)
    for index in range(12):
        s = sampler.sample(0, 0, index)
        k = len(DATASETS[s["dataset"]]["labels"])
        assert s["image"].shape == (1, *PATCH) and s["image"].dtype == torch.float32
        assert s["target"].shape == (k, *PATCH)
        assert set(torch.unique(s["target"]).tolist()) <= {0.0, 1.0}
        assert s["class_names"] == list(DATASETS[s["dataset"]]["labels"].values())
        assert len(s["target_texts"]) == k
        assert all(name in text.lower() for name, text in zip(s["class_names"], s["target_texts"]))
        assert s["modality"] == ("CT", "MRI", "PET").index(DATASETS[s["dataset"]]["modality"])


def test_parent_class_mask_contains_its_descendant(store, config):
    sampler = _sampler(store, config, augment_patches=False, foreground_ratio=1.0)
    seen_tumor = False
    for index in range(40):
        s = sampler.sample(0, 1, index)
        if "liver tumor" in s["class_names"]:
            liver = s["target"][s["class_names"].index("liver")]
            tumor = s["target"][s["class_names"].index("liver tumor")]
            assert torch.all(liver >= tumor)
            seen_tumor |= bool(tumor.any())
    assert seen_tumor


def test_foreground_ratio_is_respected(store, config):
    for ratio in (0.0, 1.0, 0.5):
        sampler = _sampler(store, config, augment_patches=False, foreground_ratio=ratio)
        samples = [sampler.sample(1, step, i) for step in range(50) for i in range(2)]
        centred = np.mean([s["foreground_centre"] is not None for s in samples])
        if ratio in (0.0, 1.0):
            assert centred == ratio
        else:
            assert 0.35 < centred < 0.65
        if ratio == 1.0:
            # A foreground-centred patch contains an annotated voxel.
            assert all(s["target"].amax() == 1 for s in samples)


def test_dataset_weights_steer_sampling(store, config):
    cases = pretraining_cases(config, store.values())
    sampler = PatchSampler(cases, PATCH, weights={"toy_ct": 9.0, "toy_mr": 1.0}, augment_patches=False)
    drawn = [sampler.sample(0, step, 0)["dataset"] for step in range(200)]
    assert 0.8 < drawn.count("toy_ct") / len(drawn) < 0.97


def test_extract_pads_small_volumes():
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = extract(volume, [-1, 0, -2], [4, 3, 8], fill=None)
    assert out.shape == (4, 3, 8)
    assert np.array_equal(out[1:3, :, 2:6], volume)
    assert out[0].min() == volume.min() and out[0].max() == volume.min()
    label = extract(volume.astype(np.uint8), [-1, 0, -2], [4, 3, 8], fill=0)
    assert label[0].max() == 0


def test_collate_pads_classes_with_zero_weight(store, config):
    sampler = _sampler(store, config)
    by_dataset = {}
    index = 0
    while len(by_dataset) < 2:
        s = sampler.sample(0, 0, index)
        by_dataset.setdefault(s["dataset"], s)
        index += 1
    batch = collate_patches([by_dataset["toy_mr"], by_dataset["toy_ct"]])
    assert batch["image"].shape == (2, 1, *PATCH)
    assert batch["target"].shape == (2, 3, *PATCH)
    assert batch["class_weight"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert not batch["target"][0, 2].any()
    assert batch["modality"].dtype == torch.long
    # Masks cross worker processes and the host-to-device copy as bytes, not float32.
    assert batch["target"].dtype == torch.uint8 and batch["image"].dtype == torch.float32


def test_batch_loss_on_uint8_masks_equals_float_targets(store, config):
    from duplus.model import DuPLUS, ModelConfig
    from duplus.prompts.cache import PromptCache
    from duplus.train.batches import TextTable, batch_loss
    from duplus.train.losses import masked_loss

    sampler = _sampler(store, config)
    batch = collate_patches([sampler.sample(0, 0, i) for i in range(2)])
    texts = sampler.all_texts()
    cache = PromptCache({t: torch.randn(16, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(texts)},
                        "test", 16)
    table = TextTable(cache, texts, torch.device("cpu"))
    torch.manual_seed(0)
    model = DuPLUS(ModelConfig.preset("tiny", text_dim=16)).eval()
    loss = batch_loss(model, batch, table, None)
    with torch.no_grad():
        logits = model(batch["image"], batch["modality"], table.context(batch["context"]),
                       table.targets(batch["target_texts"], batch["target"].shape[1]))
    expected = masked_loss(logits, batch["target"].float(), batch["class_weight"])
    assert batch["target"].any()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_loader_batches_do_not_depend_on_worker_count_or_start(store, config):
    sampler = _sampler(store, config)
    whole = list(make_loader(sampler, seed=4, batch_size=2, grad_accum=2, start_step=0, end_step=3))
    assert len(whole) == 6  # 3 steps x 2 micro-batches
    resumed = list(make_loader(sampler, seed=4, batch_size=2, grad_accum=2, start_step=2, end_step=3, num_workers=2))
    for a, b in zip(whole[4:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
        assert a["case"] == b["case"]


def test_missing_array_names_the_file(store, config, tmp_path):
    cases = pretraining_cases(config, store.values())
    broken = [c.__class__(**{**c.__dict__, "image": tmp_path / "gone.npy"}) for c in cases]
    sampler = PatchSampler(broken, PATCH, augment_patches=False)
    with pytest.raises(DataError, match="gone.npy"):
        sampler.sample(0, 0, 0)


def test_left_right_classes_are_never_mirrored_into_each_other():
    """A patch whose left half is 'left kidney': after augmentation the label stays on the left."""
    from duplus.train.augment import augment, build_augmentation, has_lateral_classes

    assert has_lateral_classes(["liver", "left kidney"]) and has_lateral_classes(["Right_Lung"])
    assert not has_lateral_classes(["liver", "spleen", "liver tumor"])
    image = torch.zeros((1, 8, 8, 8))
    target = torch.zeros((1, 8, 8, 8))
    target[0, :, :, :4] = 1  # the low-X half
    lateral = build_augmentation("CT", (8, 8, 8), lateral=True)
    free = build_augmentation("CT", (8, 8, 8), lateral=False)
    moved_free = 0
    for seed in range(40):
        _, kept = augment(lateral, image, target, seed)
        assert kept[0, :, :, :4].sum() == target.sum(), f"seed {seed} mirrored a lateral class"
        _, other = augment(free, image, target, seed)
        moved_free += int(other[0, :, :, :4].sum() != target.sum())
    assert moved_free > 0  # without the rule, some seeds do swap the sides


def test_modality_indices_follow_the_networks_stem_order(store, config):
    cases = pretraining_cases(config, store.values())
    default = PatchSampler(cases, PATCH, augment_patches=False)
    reordered = PatchSampler(cases, PATCH, augment_patches=False, modalities=("MRI", "CT", "PET"))
    assert default.modality_ids == {"CT": 0, "MRI": 1}
    assert reordered.modality_ids == {"CT": 1, "MRI": 0}
    with pytest.raises(ConfigError, match="'MRI'.*the model has stems for"):
        PatchSampler(cases, PATCH, modalities=("CT", "PET"))


def test_dataset_weights_are_checked(store, config):
    cases = pretraining_cases(config, store.values())
    weighted = PatchSampler(cases, PATCH, weights={"toy_ct": 3.0}, augment_patches=False)
    assert weighted.probabilities.tolist() == pytest.approx([0.75, 0.25])
    with pytest.raises(ConfigError, match=r"\['typo_name'\] are not datasets being trained"):
        PatchSampler(cases, PATCH, weights={"typo_name": 5.0})
    with pytest.raises(ConfigError, match="positive sum"):
        PatchSampler(cases, PATCH, weights={"toy_ct": 0.0, "toy_mr": 0.0})


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(store, config):
    """Micro-batches with 2 and 3 supervised classes: the step's weights divide both, as in one batch."""
    from duplus.model import DuPLUS, ModelConfig
    from duplus.prompts.cache import PromptCache
    from duplus.train.batches import TextTable, accumulated_loss

    sampler = _sampler(store, config)
    by_dataset, index = {}, 0
    while len(by_dataset) < 2:
        s = sampler.sample(0, 0, index)
        by_dataset.setdefault(s["dataset"], s)
        index += 1
    samples = [by_dataset["toy_mr"], by_dataset["toy_ct"]]
    texts = sampler.all_texts()
    cache = PromptCache({t: torch.randn(16, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(texts)},
                        "test", 16)
    table = TextTable(cache, texts, torch.device("cpu"))
    torch.manual_seed(0)
    model = DuPLUS(ModelConfig.preset("tiny", text_dim=16))

    def gradients(micro):
        model.zero_grad()
        loss = accumulated_loss(model, micro, table, None, lambda part: part.backward())
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one_loss, one = gradients([collate_patches(samples)])
    two_loss, two = gradients([collate_patches([s]) for s in samples])
    assert torch.allclose(one_loss, two_loss, atol=1e-6)
    assert len(one) == len(two) and all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(one, two))


def test_a_patch_overhanging_its_volume_is_padded_with_the_volumes_minimum(store, config):
    """As inference pads (stitching): the crop's own minimum would be tissue when the crop lies in the body."""
    sampler = _sampler(store, config, augment_patches=False)
    checked = 0
    for index in range(60):
        sample = sampler.sample(0, 0, index)
        record = next(c for c in sampler.by_dataset[sample["dataset"]] if c.case == sample["case"])
        if record.shape[0] >= PATCH[0]:
            continue  # only the 12-slice cases overhang a 16-slice patch
        image = sample["image"][0].numpy()
        # A slice of the (noisy) volume is never constant; a padded one is.
        padded = [z for z in range(PATCH[0]) if np.all(image[z] == image[z].flat[0])]
        assert len(padded) == PATCH[0] - record.shape[0]
        assert {float(image[z].flat[0]) for z in padded} == {float(np.load(record.image).min())}
        checked += 1
    assert checked
