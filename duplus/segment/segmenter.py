"""The segmentation of scans with one request and one loaded model: read and check, predict, write.

A scan is read (NIfTI/NRRD/MHA or a DICOM folder), checked and preprocessed as in training, predicted
by sliding windows, restored onto its own grid and written with a JSON report of the run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from duplus import __version__
from duplus.errors import DataError
from duplus.segment.outputs import REPORT, check_outputs, output_names, write_masks
from duplus.segment.request import resolve_request
from duplus.settings import Settings

log = logging.getLogger("duplus.segment")


class Prepared(NamedTuple):
    """A scan read, checked, hashed and preprocessed: all a prediction needs of it (made ahead in batch mode)."""

    image: str
    scan: Any
    sources: list[Path]
    sha256: str
    array: Any
    meta: Any
    seconds: float


class Segmenter:
    """The request and (once a scan needs it) model of `duplus segment`, for one scan or many.

    Everything that does not depend on a scan is checked on construction (``options``: see
    :func:`~duplus.segment.request.resolve_request`), before any scan is read; the network and the
    prompt embeddings load with the first scan and serve every later one.
    """

    def __init__(self, prompts: str | Sequence[str] | None, modality: str, **options: Any) -> None:
        self.request = resolve_request(prompts, modality, **options)
        self._sidecar: dict[str, Any] | None = None
        self._adapter_sha256: str | None = None
        self._zero_shot: list[str] | None = None
        self._loaded: tuple[Any, Any] | None = None  # (model, prompt embeddings)
        self.load_seconds = 0.0

    def sidecar(self) -> dict[str, Any]:
        """The model's sidecar (its JSON only: the weights load, and are verified against it, in :meth:`load`)."""
        if self._sidecar is None:
            from duplus.model import read_sidecar

            self._sidecar = read_sidecar(self.request.weights)
        return self._sidecar

    def files(self, fmt: str) -> list[str]:
        return output_names(self.request.names, self.request.multilabel, fmt)

    def window_config(self) -> dict[str, Any]:
        from duplus.model import with_trained_window

        return with_trained_window(self.request.config, self.sidecar())

    def settings(self, fmt: str, channel: int | None) -> dict[str, Any]:
        """What decides the masks, besides the scan: a rerun whose report holds the same settings may skip it."""
        from duplus.inference.predict import inference_settings

        request, sidecar = self.request, self.sidecar()
        settings = inference_settings(self.window_config())
        return {
            "model_sha256": sidecar["sha256"], "adapter_sha256": self.adapter_sha256(),
            "modality": request.modality, "region": request.region, "sequence": request.sequence,
            "context_prompt": request.context_text, "classes": request.names, "texts": request.texts,
            "threshold": settings["threshold"] if request.threshold is None else float(request.threshold),
            "window": [int(v) for v in settings["roi"]], "overlap": settings.get("overlap"),
            "preprocess": self.preprocess_config().get("preprocess"),
            "multilabel": request.multilabel, "format": fmt, "channel": channel,
        }

    def zero_shot(self) -> list[str]:
        """Prompts the model never trained on (its sidecar's classes, modalities and regions), one line each."""
        from duplus.segment.knowledge import trained_on, zero_shot_notes

        if self._zero_shot is None:
            request = self.request
            self._zero_shot = zero_shot_notes(trained_on(self.sidecar(), request.config), request.modality,
                                              request.region, request.names)
        return self._zero_shot

    def adapter_sha256(self) -> str | None:
        from duplus.segment.network import adapter_hash

        if self._adapter_sha256 is None:
            self._adapter_sha256 = adapter_hash(self.request.adapter) or ""
        return self._adapter_sha256 or None

    def preprocess_config(self) -> dict[str, Any]:
        config = self.request.config
        return {**config, "preprocess": self.sidecar().get("preprocess", config.get("preprocess") or {})}

    # Read and check

    def prepare(self, image: str | Path, channel: int | None = None) -> Prepared:
        """Read, check, hash and preprocess ``image`` (safe to run in a thread beside :meth:`predict`)."""
        from duplus.data.image_io import read_image_files
        from duplus.hashing import sha256_files

        started = time.perf_counter()
        scan, sources = read_image_files(image, channel)  # DataError naming the file: missing, unreadable, 4-D, NaN
        return self._prepared(scan, sources, str(image), sha256_files(sources), started)

    def prepare_image(self, scan: Any, name: str = "image") -> Prepared:
        """:meth:`prepare` for a SimpleITK image in memory (``name`` is what messages call it)."""
        from duplus.data.image_io import check_image

        started = time.perf_counter()
        return self._prepared(check_image(scan, name), [], name, "", started)

    def _prepared(self, scan: Any, sources: list[Path], image: str, input_sha256: str, started: float) -> Prepared:
        from duplus.data.preprocess import prepare_image
        from duplus.segment.checks import warn_if_wrong_modality

        direction = np.asarray(scan.GetDirection(), dtype=float).reshape(3, 3)
        if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
            raise DataError(f"{image}: the scan's grid is sheared (its direction matrix is not orthonormal, e.g. a CT "
                            "gantry tilt); preprocessing and restoring assume an orthogonal grid, so resample the scan "
                            "onto one first")
        warn_if_wrong_modality(scan, self.request.modality, image)
        try:
            array, meta = prepare_image(scan, self.request.modality, self.preprocess_config())
        except DataError as error:
            raise DataError(f"{image}: {error}") from None
        return Prepared(image, scan, sources, input_sha256, array, meta, time.perf_counter() - started)

    # Predict

    def load(self) -> tuple[Any, Any]:
        """The network and the prompt embeddings, loaded on first use (a cached network is reused)."""
        if self._loaded is None:
            from duplus.runtime import configure_kernels
            from duplus.segment.network import load_network_and_prompts

            started = time.perf_counter()
            configure_kernels(self.request.device, Settings.of(self.request.config).deterministic)
            model, self._sidecar, cache = load_network_and_prompts(self.request)
            self._loaded = (model, cache)
            for note in self.zero_shot():
                log.warning("%s", note)
            self.load_seconds = time.perf_counter() - started
        return self._loaded

    def predict(self, prepared: Prepared) -> Any:
        """Masks of the prompted classes on the preprocessed grid (``PackedMasks``)."""
        from duplus.inference.predict import predict_masks

        model, cache = self.load()
        request = self.request
        return predict_masks(model, prepared.array, request.modality, cache.get(request.context_text),
                             cache.get_many(request.texts), self.window_config(), threshold=request.threshold,
                             desc="segment")

    def masks(self, prepared: Prepared) -> dict[str, Any]:
        """Class name -> uint8 SimpleITK mask on the scan's own grid (nothing written)."""
        from duplus.segment.outputs import restored_mask

        masks = self.predict(prepared)
        return {name: restored_mask(masks, k, prepared.meta) for k, name in enumerate(self.request.names)}

    # One scan: outputs checked, read and check, predict, write

    def segment(self, image: str | Path, out_dir: str | Path, *, channel: int | None = None,
                mask_format: str | None = None, prepared: Prepared | None = None,
                output_type: str | None = None) -> dict[str, Any]:
        """Segment ``image`` into ``out_dir``; returns the run report (also written as JSON, last).

        ``output_type``: one of ``OUTPUT_TYPES`` (default masks); a DICOM type needs a DICOM series folder.

        ``prepared``: the scan already read by :meth:`prepare` (batch mode reads the next scan
        while this one is predicted).
        """
        from duplus.segment.outputs import output_format, prepare_folder, previous_outputs, remove_stale

        started = time.perf_counter()
        fmt = output_format(image, mask_format, output_type)
        files = self.files(fmt)
        check_outputs(image, out_dir, files)  # before any work: never over the input
        read_ahead = prepared is not None
        if prepared is None:
            prepared = self.prepare(image, channel)
        timings = {"read_and_preprocess": prepared.seconds}
        # Only once the scan is known good: a mistyped -i must not create folders or touch an earlier run.
        out = prepare_folder(out_dir)
        previous = previous_outputs(out)
        masks = self._timed_prediction(prepared, timings)

        mark = time.perf_counter()
        remove_stale(out, previous, files, image)
        outputs = write_masks(out, masks, prepared.meta, self.request.names, self.request.multilabel, fmt,
                              prepared.sources, image)
        timings["restore_and_write"] = time.perf_counter() - mark
        # A scan read ahead (in a thread, while the one before it was predicted) adds its reading time.
        timings["total"] = time.perf_counter() - started + (prepared.seconds if read_ahead else 0.0)
        return self._write_report(out / REPORT, image, prepared, outputs, timings, fmt, channel)

    def _timed_prediction(self, prepared: Prepared, timings: dict[str, float]) -> Any:
        already = self._loaded is not None
        self.load()
        timings["load_model"] = 0.0 if already else self.load_seconds
        mark = time.perf_counter()
        masks = self.predict(prepared)
        timings["predict"] = time.perf_counter() - mark
        return masks

    def _write_report(self, path: Path, image: str | Path, prepared: Prepared, outputs: list[str],
                      timings: dict[str, float], fmt: str, channel: int | None) -> dict[str, Any]:
        """The run's report, written last (its presence marks a completed run); returned with its path."""
        from duplus.atomic import write_json

        request, scan, sidecar = self.request, prepared.scan, self.sidecar()
        settings = self.settings(fmt, channel)
        report = {
            "duplus_version": __version__,
            "input": str(image),
            "input_geometry": {"size": list(scan.GetSize()), "spacing": list(scan.GetSpacing()),
                               "origin": list(scan.GetOrigin()), "direction": list(scan.GetDirection())},
            "model": {"weights": request.weights, "sha256": sidecar["sha256"],
                      "text_encoder": sidecar.get("text_encoder")},
            "adapter": {"path": str(request.adapter), "sha256": settings["adapter_sha256"]} if request.adapter else None,
            "modality": request.modality, "region": request.region, "sequence": request.sequence,
            "context_prompt": request.context_text,
            "prompts": [{"phrase": item.phrase, "class": item.canonical, "text": item.text, "label": i + 1,
                         "declared_class": item.canonical in request.declared,
                         "output": outputs[0] if request.multilabel else outputs[i]}
                        for i, item in enumerate(request.resolved)],
            "threshold": settings["threshold"], "window": settings["window"], "device": str(request.device),
            "outputs": outputs,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            # One file: its sha256; a .mhd/.nhdr header and its data, or a DICOM series: see sha256_files.
            "input_sha256": prepared.sha256, "input_files_hashed": len(prepared.sources),
            "input_files": [str(path) for path in prepared.sources],
            "channel": channel, "format": fmt,
            "zero_shot": self.zero_shot(),
            # What a rerun compares to skip this scan (batch mode): see Segmenter.settings.
            "settings": settings,
        }
        report["report"] = str(path)
        write_json(path, report)
        return report
