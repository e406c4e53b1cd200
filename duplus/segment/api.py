"""The Python entry points of `duplus segment`: one scan into an output folder (:func:`segment_image`), or
images in memory to masks in memory (:func:`segment_images`, for notebooks)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from duplus.errors import DataError
from duplus.segment.segmenter import Segmenter


def segment_image(
    image: str,
    out_dir: str,
    prompts: str | Sequence[str] | None,
    modality: str,
    *,
    channel: int | None = None,
    mask_format: str | None = None,
    output_type: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Segment ``image`` for the prompted classes; returns the run report (also written as JSON, last).

    ``options`` are :func:`~duplus.segment.request.resolve_request`'s (region, sequence, weights, sha256,
    adapter, dataset_classes, multilabel, device, prompt_cache, config, threshold). Masks are written as
    ``mask_format`` (one of ``FORMATS``; default: the input's format, see
    :func:`duplus.segment.outputs.output_format`), or, for a DICOM series, as one DICOM SEG or RTSTRUCT
    file (``output_type``, see :mod:`duplus.segment.dicom`). Files an earlier run's report in ``out_dir``
    lists and this run does not write are removed, as is that report, before the masks are written.
    """
    return Segmenter(prompts, modality, **options).segment(image, out_dir, channel=channel, mask_format=mask_format,
                                                           output_type=output_type)


# The Segmenter of the last `segment_images` call: the same prompts and options again reuse its prompt
# embeddings (a text encoder loads only for prompts the cache lacks); the network is cached apart.
_LAST_SEGMENTER: dict[str, Segmenter] = {}


def segment_images(
    images: Any,
    prompts: str | Sequence[str] | None,
    modality: str,
    *,
    spacing: Sequence[float] | None = None,
    **options: Any,
) -> Any:
    """Masks of the prompted classes for images in memory; nothing is written.

    ``images``: a SimpleITK image or a numpy array [Z, Y, X] (``spacing``: its x, y, z voxel size in
    mm, default 1 mm), or a list of them. Returns, per image, ``{class name: mask}`` on the image's
    own grid: a uint8 SimpleITK image for an image, a uint8 array for an array (a list for a list).
    ``options`` are :func:`~duplus.segment.request.resolve_request`'s (weights, prompt_cache, device,
    region, threshold, config...). The network loads once and is kept for later calls.
    """
    import json

    import SimpleITK as sitk

    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    key = json.dumps([prompts, modality, options], sort_keys=True, default=str)
    if key not in _LAST_SEGMENTER:
        _LAST_SEGMENTER.clear()
        _LAST_SEGMENTER[key] = Segmenter(prompts, modality, **options)
    segmenter = _LAST_SEGMENTER[key]
    results = []
    for index, item in enumerate(items):
        is_array = isinstance(item, np.ndarray)
        if is_array:
            if item.ndim != 3:
                raise DataError(f"image {index}: expected a 3-D array [Z, Y, X], got shape {item.shape}")
            scan = sitk.GetImageFromArray(np.ascontiguousarray(item, dtype=np.float32))
            scan.SetSpacing(tuple(float(v) for v in (spacing or (1.0, 1.0, 1.0))))
        elif isinstance(item, sitk.Image):
            scan = item
        else:
            raise DataError(f"image {index}: expected a SimpleITK image or a numpy array, got {type(item).__name__}")
        masks = segmenter.masks(segmenter.prepare_image(scan, f"image {index}"))
        results.append({name: sitk.GetArrayFromImage(mask) if is_array else mask for name, mask in masks.items()})
    return results[0] if single else results
