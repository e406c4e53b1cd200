"""Training patches: foreground-biased crops of memory-mapped cases, per-class targets and prompt texts.

Every sample is a pure function of (seed, step, index in step), whatever the number of loader workers.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from duplus.data.manifest import CaseRecord
from duplus.errors import DataError
from duplus.train.augment import augment, build_augmentation, has_lateral_classes
from duplus.train.cases import dataset_weights

# Locations per case are tiny (<= 4096 x 3 int32 per label); keeping them saves a zip open per
# sample. Memory maps are not cached: each holds a file descriptor.
_LOCATION_CACHE_CASES = 4096


def masks_from_label(label: np.ndarray, label_map: Mapping[int, str], classes: Sequence[str]) -> np.ndarray:
    """Per-class masks, a class including its descendants (see ``duplus.data.taxonomy``)."""
    from duplus.data.taxonomy import masks_from_label as taxonomy_masks

    return taxonomy_masks(label, dict(label_map), list(classes))


def texts_for_case(record: CaseRecord, paraphrases: bool) -> tuple[str, list[list[str]]]:
    """Context prompt and, per class, the target prompts a sample of this case may carry."""
    from duplus.prompts.templates import context_prompt, target_prompts

    context = context_prompt(record.modality, record.region, record.sequence)
    targets = []
    for name in record.classes:
        options = list(target_prompts(record.modality, name, record.sequence))
        targets.append(options if paraphrases else options[:1])
    return context, targets


def crop_start(rng: np.random.Generator, size: int, patch: int, centre: int | None) -> int:
    """First index of the crop along one axis; negative when the volume is smaller than the patch."""
    if size <= patch:
        # The whole axis fits: place it at a random offset inside the padded patch.
        return -int(rng.integers(0, patch - size + 1))
    if centre is None:
        return int(rng.integers(0, size - patch + 1))
    return int(np.clip(centre - patch // 2, 0, size - patch))


def extract(volume: np.ndarray, start: Sequence[int], patch: Sequence[int], fill: float | None) -> np.ndarray:
    """Copy ``volume[start:start+patch]``, padding outside the volume with ``fill`` (None: the crop's minimum)."""
    src, dst = [], []
    for lo, p, size in zip(start, patch, volume.shape):
        s0, s1 = max(lo, 0), min(lo + p, size)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lo, s1 - lo))
    region = np.asarray(volume[tuple(src)])  # reads only the crop's pages of a memory map
    if region.shape == tuple(patch):
        return np.array(region)
    value = float(region.min()) if fill is None else fill
    out = np.full(tuple(patch), value, dtype=region.dtype)
    out[tuple(dst)] = region
    return out


class PatchSampler:
    """Draws training samples from a list of cases.

    Args:
        cases: train cases (any mix of datasets and modalities).
        patch_size: (Z, Y, X) voxels of every patch.
        weights: sampling weight per dataset, in ``datasets`` order (default: equal).
        foreground_ratio: fraction of patches centred on a labelled voxel.
        paraphrases: sample one of the target-prompt paraphrases per class (else the canonical one).
        augment_patches: apply the MONAI augmentation.
    """

    def __init__(
        self,
        cases: Sequence[CaseRecord],
        patch_size: Sequence[int],
        weights: Mapping[str, float] | None = None,
        foreground_ratio: float = 0.67,
        paraphrases: bool = True,
        augment_patches: bool = True,
        modalities: Sequence[str] | None = None,
    ) -> None:
        from duplus.model import MODALITIES, modality_index

        if not cases:
            raise DataError("no case to sample training patches from")
        self.patch_size = tuple(int(v) for v in patch_size)
        self.datasets = sorted({c.dataset for c in cases})
        self.by_dataset = {name: [c for c in cases if c.dataset == name] for name in self.datasets}
        # Checked: a misspelled dataset name or all-zero weights are config errors, not silence or NaN.
        probabilities = dataset_weights({"pretrain": {"dataset_weights": dict(weights or {})}}, self.datasets)
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.foreground_ratio = float(foreground_ratio)
        self.paraphrases = paraphrases
        self.augment_patches = augment_patches
        # Indices in the trained network's stem order (model.overrides.modalities may change it).
        stems = tuple(modalities) if modalities is not None else MODALITIES
        self.modality_ids = {c.modality: modality_index(c.modality, stems) for c in cases}
        self.texts = {(c.dataset, c.case): texts_for_case(c, paraphrases) for c in cases}
        self.lateral = {name: has_lateral_classes(cases_[0].classes) for name, cases_ in self.by_dataset.items()}
        self._augmenters = {
            (c.modality, self.lateral[c.dataset]): build_augmentation(c.modality, self.patch_size, self.lateral[c.dataset])
            for c in cases
        }
        self._locations: dict[tuple[str, str], dict[int, np.ndarray]] = {}
        self._floors: dict[tuple[str, str], float] = {}

    def all_texts(self) -> list[str]:
        """Every context and target text a sample can carry (to look up before training starts)."""
        contexts, targets = self.text_groups()
        return sorted(set(contexts) | set(targets))

    def text_groups(self) -> tuple[list[str], list[str]]:
        """(every context text, every target text) a sample can carry, sorted, without repeats."""
        contexts = sorted({context for context, _ in self.texts.values()})
        targets = sorted({text for _, options in self.texts.values() for texts in options for text in texts})
        return contexts, targets

    def _case_locations(self, record: CaseRecord) -> dict[int, np.ndarray]:
        key = (record.dataset, record.case)
        if key not in self._locations:
            if len(self._locations) >= _LOCATION_CACHE_CASES:
                self._locations.clear()
            try:
                with np.load(record.locations, allow_pickle=False) as archive:
                    found = {int(name): np.asarray(archive[name]) for name in archive.files}
            except (OSError, ValueError) as error:
                raise DataError(f"{record.locations}: cannot read foreground locations ({error})") from error
            self._locations[key] = {i: v for i, v in found.items() if i in record.label_map and len(v)}
        return self._locations[key]

    def _load(self, path: Any, record: CaseRecord) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cannot memory-map array of case '{record.case}' ({error})") from error
        if array.shape != record.shape:
            raise DataError(f"{path}: shape {array.shape} differs from the manifest's {record.shape}")
        return array

    def _floor(self, record: CaseRecord, volume: np.ndarray) -> float:
        """The case's lowest value, once per case and process: what inference pads a volume with
        (``duplus.inference.stitching``); a crop's own minimum is tissue when the crop lies in the body."""
        key = (record.dataset, record.case)
        if key not in self._floors:
            self._floors[key] = float(np.min(volume))
        return self._floors[key]

    def sample(self, seed: int, step: int, index: int) -> dict[str, Any]:
        """The ``index``-th sample of optimizer step ``step``: a pure function of its arguments."""
        rng = np.random.default_rng([int(seed), int(step), int(index)])
        dataset = self.datasets[int(rng.choice(len(self.datasets), p=self.probabilities))]
        record = self.by_dataset[dataset][int(rng.integers(len(self.by_dataset[dataset])))]
        centre: Sequence[int | None] = (None, None, None)
        if rng.random() < self.foreground_ratio:
            locations = self._case_locations(record)
            if locations:
                label_id = sorted(locations)[int(rng.integers(len(locations)))]
                points = locations[label_id]
                centre = tuple(int(v) for v in points[int(rng.integers(len(points)))])
        start = [crop_start(rng, size, p, c) for size, p, c in zip(record.shape, self.patch_size, centre)]
        volume = self._load(record.image, record)
        pads = any(lo < 0 or lo + p > n for lo, p, n in zip(start, self.patch_size, record.shape))
        image = extract(volume, start, self.patch_size, fill=self._floor(record, volume) if pads else None)
        label = extract(self._load(record.label, record), start, self.patch_size, fill=0)
        classes = record.classes
        target = masks_from_label(label, record.label_map, classes)
        image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        # Masks travel as uint8 (4x less to copy between workers, pin and send to the GPU than
        # float32); the loss casts them on the device.
        target_t = torch.from_numpy(target.view(np.uint8))
        aug_seed = int(rng.integers(2**31 - 1))
        if self.augment_patches:
            augmenter = self._augmenters[(record.modality, self.lateral[record.dataset])]
            image_t, target_t = augment(augmenter, image_t, target_t, aug_seed)
        context, options = self.texts[(record.dataset, record.case)]
        chosen = [texts[int(rng.integers(len(texts)))] for texts in options]
        return {
            "image": image_t,
            "target": target_t,
            "class_names": list(classes),
            "modality": self.modality_ids[record.modality],
            "dataset": record.dataset,
            "case": record.case,
            "context": context,
            "target_texts": chosen,
            "foreground_centre": None if centre[0] is None else list(centre),
        }


def collate_patches(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples; pad the class axis to the batch's largest K with class weight 0.

    A padded class, like any class the sample's dataset does not annotate, is never supervised.
    Targets stay uint8 masks [B, K, *patch]; ``batch_loss`` casts them on the device.
    """
    k_max = max(s["target"].shape[0] for s in samples)
    patch = samples[0]["image"].shape[1:]
    target = torch.zeros((len(samples), k_max, *patch), dtype=torch.uint8)
    weight = torch.zeros((len(samples), k_max), dtype=torch.float32)
    for b, s in enumerate(samples):
        k = s["target"].shape[0]
        target[b, :k] = s["target"]
        weight[b, :k] = 1.0
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "target": target,
        "class_weight": weight,
        "modality": torch.tensor([s["modality"] for s in samples], dtype=torch.long),
        "class_names": [s["class_names"] for s in samples],
        "dataset": [s["dataset"] for s in samples],
        "case": [s["case"] for s in samples],
        "context": [s["context"] for s in samples],
        "target_texts": [s["target_texts"] for s in samples],
    }


class StepSamples(Dataset):
    """Map-style view: flat index -> (step, index in step) -> sample; order-independent."""

    def __init__(self, sampler: PatchSampler, seed: int, samples_per_step: int) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.samples_per_step = int(samples_per_step)

    def __getitem__(self, flat: int) -> dict[str, Any]:
        step, index = divmod(int(flat), self.samples_per_step)
        return self.sampler.sample(self.seed, step, index)

    def __len__(self) -> int:  # unbounded in principle; the loader's index range bounds it
        return 2**62


class RankIndices:
    """Flat sample indices of one rank, step by step, micro-batch by micro-batch (lazy)."""

    def __init__(self, start_step: int, end_step: int, batch_size: int, grad_accum: int, rank: int, world: int) -> None:
        self.start_step, self.end_step = int(start_step), int(end_step)
        self.batch_size, self.grad_accum = int(batch_size), int(grad_accum)
        self.per_rank = self.batch_size // int(world)
        self.offset = int(rank) * self.per_rank

    def __iter__(self):
        per_step = self.batch_size * self.grad_accum
        for step in range(self.start_step, self.end_step):
            for micro in range(self.grad_accum):
                first = step * per_step + micro * self.batch_size + self.offset
                yield from range(first, first + self.per_rank)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.grad_accum * self.per_rank


def _worker_init(_: int) -> None:
    # Each worker cuts and augments one patch at a time; many intra-op threads only oversubscribe.
    torch.set_num_threads(1)
    # SLURM's preemption notice (--signal=TERM@...) and torchrun's forwarding reach every process of
    # the job. A worker dying of it would make the training process fail in the middle of its
    # checkpoint; the training process decides, and shuts its workers down (workers_closed).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def workers_closed(batches: Any) -> Iterator[Any]:
    """Shut the worker processes of a DataLoader iterator down when the block ends, however it
    ends: they ignore SIGTERM, so nothing else stops them on an interruption."""
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


def make_loader(
    sampler: PatchSampler,
    seed: int,
    batch_size: int,
    grad_accum: int,
    start_step: int,
    end_step: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """Micro-batches of optimizer steps ``start_step .. end_step-1``, ``grad_accum`` per step, in order.

    ``batch_size`` is the global micro-batch; with ``world`` data-parallel ranks, rank ``rank``
    loads its contiguous ``batch_size // world`` share of each, so the ranks together draw exactly
    the samples one process would.
    """
    per_step = batch_size * grad_accum
    per_rank = batch_size // world
    if per_rank * world != batch_size:
        raise DataError(f"a global batch of {batch_size} does not split over {world} ranks")
    indices = RankIndices(start_step, end_step, batch_size, grad_accum, rank, world)
    return DataLoader(
        StepSamples(sampler, seed, per_step),
        batch_size=per_rank,
        sampler=indices,
        num_workers=num_workers,
        collate_fn=collate_patches,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
