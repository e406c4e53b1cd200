"""The prognosis stage: EHR + image features of the prognosis dataset(s) -> cross-validated survival
models -> results/prognosis/{folds,summary,risks}.csv and km.json.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from duplus.atomic import write_csv, write_json
from duplus.data.manifest import CaseRecord, read_manifests, select_cases
from duplus.data.registry import listed_datasets
from duplus.errors import ConfigError, DataError, EHRError
from duplus.prognosis.calibration import calibration, default_calibration_horizon
from duplus.prognosis.ehr import EHRSchema, check_cohort, load_ehr
from duplus.prognosis.evaluate import (
    AUC_COLUMNS,
    FOLD_COLUMNS,
    RISK_COLUMNS,
    SUMMARY_COLUMNS,
    center_folds,
    cohort_times,
    cross_validate,
    default_horizons,
    km_curves,
    make_folds,
    summarize,
)
from duplus.prognosis.features import MASK_SOURCES, CaseInput, FeatureSettings, extract_features, feature_names
from duplus.prognosis.intervals import bootstrap_intervals
from duplus.prognosis.models import Cohort, ModelSettings, model_names
from duplus.prognosis.text import text_features
from duplus.runtime import device_for, seed_everything
from duplus.settings import Settings

log = logging.getLogger(__name__)


def run_prognosis(config: Mapping[str, Any], manifest: str | os.PathLike | Sequence[str | os.PathLike],
                  prompt_cache: str | os.PathLike | Any, model_path: str | os.PathLike, out_dir: str | os.PathLike,
                  model: Any = None, model_key: str | None = None) -> pd.DataFrame:
    """Run the prognosis stage and write its outputs to ``out_dir``; returns the summary table.

    Args:
        config: the full validated config; ``prognosis.dataset: null`` runs the EHR routes and
            baselines on ``prognosis.ehr.table`` alone (manifest, prompt cache and model unused);
            a list of datasets (scans of the same patients) gives each patient one block of
            features per dataset, concatenated (:func:`_image_features`).
        manifest: manifest.csv of the prognosis dataset (or several manifests; rows of the
            ``prognosis.dataset`` datasets are used, all splits).
        prompt_cache: the prompt cache file (or a loaded cache with ``get``).
        model_path: the pretrained DuPLUS weights.
        out_dir: results/prognosis; image features are cached in ``out_dir/features/<dataset>/``.
        model: an already loaded (e.g. LoRA-adapted) model to take features from instead of
            ``model_path``'s; pass ``model_key`` (a hash of base + adapter) so the cache tells them apart.
    """
    out = Path(out_dir)
    configured = Settings.of(config)
    prog = configured.prognosis
    if not prog.enabled:
        return _write_disabled(out)
    seed = configured.seed
    seed_everything(seed)
    # No dataset: EHR only, the table's patients without images (the EHR routes and baselines).
    datasets = listed_datasets(prog.dataset)
    schema = EHRSchema.from_config(configured)
    n_folds = prog.folds
    merge = list(prog.merge)
    image, image_names, blocks, settings, center = None, None, [], None, None
    warnings: list[str] = []
    incomplete: dict[str, list[str]] = {}
    if not datasets:
        if not schema.table:
            raise ConfigError("config prognosis.dataset is null (EHR-only prognosis) but prognosis.ehr.table is "
                              "null too: name the clinical CSV in prognosis.ehr.table")
        table = load_ehr(schema.table, schema)
        matched = table.frame[schema.id].tolist()
        if len(matched) < max(n_folds, 2):
            raise EHRError(f"EHR table {table.source}: {len(matched)} patient(s); {n_folds}-fold cross-validation "
                           f"needs at least {n_folds}")
    else:
        cases = {name: _dataset_cases(manifest, name) for name in datasets}
        with_scan = list(dict.fromkeys(case for by_id in cases.values() for case in by_id))
        # EHR ids with no scan at all are the table's problem (prognosis.ehr.allow_unmatched).
        table = load_ehr(_ehr_path(config, schema, datasets[0]), schema, image_ids=with_scan)
        table, incomplete, warning = _patients_with_every_scan(table, cases)
        warnings += [warning] if warning else []
        matched = table.frame[schema.id].tolist()
        if len(matched) < max(n_folds, 2):
            scans = f"a scan in each of {datasets}" if len(datasets) > 1 else f"an image in dataset '{datasets[0]}'"
            raise EHRError(f"EHR table {table.source}: only {len(matched)} patient(s) have {scans}; {n_folds}-fold "
                           f"cross-validation needs at least {n_folds} (for prognosis from the EHR alone, set "
                           f"prognosis.dataset: null and prognosis.ehr.table)")
        device = device_for(config)
        if model is None:
            model, model_key, config = _load_model(model_path, device, config)
        elif model_key is None:
            raise ConfigError("run_prognosis: an adapted model needs model_key (hash of its base and adapter)")
        cache = _load_prompt_cache(prompt_cache) if not hasattr(prompt_cache, "get") else prompt_cache
        image, image_names, blocks, settings = _image_features(model, model_key, cases, matched, cache, config, out,
                                                               device)
        write_csv(out / "image_features.csv", pd.DataFrame(image, columns=image_names).assign(
            **{schema.id: matched})[[schema.id, *image_names]])
        center = np.asarray([cases[datasets[0]][patient].center for patient in matched])
    if center is None and schema.center:
        # Missing centers form one stratum of their own rather than breaking the stratification.
        center = table.frame[schema.center].fillna("unknown").astype(str).to_numpy()
    if prog.split == "center":
        folds, stratified_by = center_folds(center)
    else:
        folds, stratified_by = make_folds(table.event, center, n_folds, seed)
    warnings = check_cohort(table, int(folds.max()) + 1) + warnings

    text = None
    encoding = prog.text.encoding
    if not datasets or {"text", "text_film"} & set(merge):
        text = text_features(table.frame, schema, _sentence_encoder(config), encoding)

    cohort = Cohort(ids=np.asarray(matched), time=table.time, event=table.event, ehr=table.frame,
                    schema=schema, image=image, text=text, center=center,
                    image_names=image_names)
    # A cohort without events is not an error (check_cohort warned): the stage still writes its
    # files, with NaN metrics and a note per fold, and the report shows the warning.
    models = model_names(config, cohort)
    evaluation = prog.evaluation
    horizons = list(evaluation.horizons) if evaluation.horizons else default_horizons(cohort.time, cohort.event).tolist()
    horizon = evaluation.calibration_horizon
    horizon = horizon if horizon is not None else default_calibration_horizon(cohort.time, cohort.event)
    result = cross_validate(cohort, models, folds, ModelSettings.from_config(configured), horizons=horizons,
                            calibration_horizon=horizon)
    intervals = bootstrap_intervals(result.risks, evaluation.bootstrap, seed,
                                    grid=cohort_times(cohort.time, cohort.event))
    summary = summarize(result.folds, intervals)

    write_csv(out / "folds.csv", result.folds)
    write_csv(out / "risks.csv", result.risks)
    write_json(out / "km.json", km_curves(result.groups))
    write_csv(out / "auc.csv", result.auc)
    write_json(out / "calibration.json", calibration(result.risks, horizon))
    write_csv(out / "summary.csv", summary)
    write_json(out / "cohort.json", {
        "datasets": datasets, "ehr_only": image is None, "ehr_table": table.source, "patients": len(cohort),
        "events": int(cohort.event.sum()), "unmatched_ehr_ids": table.unmatched, "folds": int(folds.max()) + 1,
        "stratified_by": stratified_by, "split": prog.split,
        "auc_horizons": horizons, "calibration_horizon": horizon, "models": models, "model_sha256": model_key,
        "tumour_mask": None if settings is None else settings.mask_source,
        "feature_dim": None if image is None else int(image.shape[1]), "image_blocks": blocks,
        "incomplete_patients": incomplete,
        "text_encoding": None if text is None else text.encoding, "text_dim": None if text is None else text.dim,
        "warnings": warnings})
    for _, row in summary.iterrows():
        log.info("prognosis %s: Harrell C %.3f ± %.3f, Uno C %.3f ± %.3f, IBS %.3f", row["model"],
                 row["harrell_c_mean"], row["harrell_c_std"], row["uno_c_mean"], row["uno_c_std"], row["ibs_mean"])
    return summary


def _write_disabled(out: Path) -> pd.DataFrame:
    """Outputs that say the stage was switched off (so the report and Snakemake find them)."""
    note = "prognosis disabled (config prognosis.enabled: false)"
    summary = pd.DataFrame([{**{c: math.nan for c in SUMMARY_COLUMNS}, "model": "none", "note": note}],
                           columns=SUMMARY_COLUMNS)
    write_csv(out / "folds.csv", pd.DataFrame(columns=FOLD_COLUMNS))
    write_csv(out / "risks.csv", pd.DataFrame(columns=RISK_COLUMNS))
    write_json(out / "km.json", {})
    write_csv(out / "auc.csv", pd.DataFrame(columns=AUC_COLUMNS))
    write_json(out / "calibration.json", {"horizon": None, "models": {}})
    write_json(out / "cohort.json", {"disabled": True, "warnings": []})
    write_csv(out / "summary.csv", summary)
    log.info(note)
    return summary


def _dataset_cases(manifest: str | os.PathLike | Sequence[str | os.PathLike], dataset: str) -> dict[str, CaseRecord]:
    """The cases of ``dataset`` in the manifest(s), every split, by case id."""
    paths = [manifest] if isinstance(manifest, (str, os.PathLike)) else list(manifest)
    records = select_cases(read_manifests(paths), split=None, datasets=[dataset])
    if not records:
        raise DataError(f"prognosis: no case of dataset '{dataset}' (config prognosis.dataset) in manifest(s) "
                        f"{[str(p) for p in paths]}")
    ids = [record.case for record in records]
    duplicated = sorted({case for case in ids if ids.count(case) > 1})
    if duplicated:
        raise DataError(f"prognosis: case id(s) {duplicated[:10]} appear twice in the manifest(s) of '{dataset}'")
    return {record.case: record for record in records}


def _patients_with_every_scan(table: Any, cases: Mapping[str, Mapping[str, CaseRecord]]
                              ) -> tuple[Any, dict[str, list[str]], str | None]:
    """The table restricted to the patients with a case in every dataset of ``cases``; the ids each
    dataset lacks; and the warning that names them (None when every patient has every scan).

    A patient without one of the scans is left out rather than given a stand-in block: zeros or a
    mean in place of a scan would read, to the survival models, as a scan that looks like that.
    """
    ids = table.frame[table.schema.id].astype(str)
    incomplete = {name: sorted(set(ids) - set(by_id)) for name, by_id in cases.items()}
    incomplete = {name: missing for name, missing in incomplete.items() if missing}
    if not incomplete:
        return table, {}, None
    dropped = sorted({i for missing in incomplete.values() for i in missing})
    listing = "; ".join(f"no {name} case for {len(missing)}: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else "") for name, missing in incomplete.items())
    warning = (f"{len(dropped)} patient(s) of the EHR table left out: image features need a scan in every "
               f"dataset of prognosis.dataset ({listing})")
    log.warning("prognosis: %s", warning)
    kept = table.frame[~ids.isin(dropped)].reset_index(drop=True)
    return replace(table, frame=kept), incomplete, warning


def _image_features(model: Any, model_key: str, cases: Mapping[str, Mapping[str, CaseRecord]], patients: list[str],
                    cache: Any, config: Mapping[str, Any], out: Path, device: Any
                    ) -> tuple[np.ndarray, list[str], list[dict[str, Any]], FeatureSettings]:
    """Each dataset's features of ``patients``, one block per dataset side by side, in ``cases``' order.

    Returns the (patients, features) array, its column names (``<dataset>/gap_0``, ...), one record
    per block (dataset, modality, first column, columns) for cohort.json, and the first block's
    settings. Each block is the model's bottleneck on that scan with its own modality stem and
    context prompt (``duplus.prognosis.features``), cached in ``out/features/<dataset>/``.
    """
    arrays, names, blocks, first = [], [], [], None
    for dataset, by_id in cases.items():
        records = [by_id[patient] for patient in patients]
        settings = _feature_settings(config, records)
        first = first or settings
        inputs = [_case_input(record, cache) for record in records]
        features = extract_features(model, inputs, out, model_key, settings, device=device, subfolder=dataset)
        block = np.stack([features[c] for c in patients])
        modalities = sorted({record.modality for record in records})
        blocks.append({"dataset": dataset, "modality": ", ".join(modalities), "first_column": sum(map(len, names)),
                       "columns": int(block.shape[1])})
        names.append([f"{dataset}/{name}" for name in feature_names((block.shape[1] - 1) // 2)])
        arrays.append(block)
    return np.concatenate(arrays, axis=1), [n for block in names for n in block], blocks, first


def _ehr_path(config: Mapping[str, Any], schema: EHRSchema, dataset: str) -> Path:
    if schema.table:
        return Path(schema.table)
    from duplus.data.registry import get_dataset, raw_folder

    raw = Settings.of(config).paths.raw
    # The (first) dataset's raw folder: HECKTOR's CT and PET datasets read one placement, which holds the table.
    return raw_folder(get_dataset(dataset, config), raw) / "clinical.csv"


def _feature_settings(config: Mapping[str, Any], cases: Sequence[CaseRecord]) -> FeatureSettings:
    settings = Settings.of(config)
    # Which mask pools the tumour features: the model's own prediction (what a new patient has)
    # or the ground-truth label (an upper bound).
    mask_source = settings.prognosis.tumour_mask
    if mask_source not in MASK_SOURCES:
        raise ConfigError(f"config prognosis.tumour_mask must be one of {MASK_SOURCES}, got {mask_source!r}")
    tumour_ids = sorted({label_id for case in cases for label_id in case.label_map})
    return FeatureSettings(mask_source=mask_source, threshold=settings.inference.threshold,
                           tumour_labels=tuple(tumour_ids), voxel_ml=float(np.prod(settings.preprocess.spacing)) / 1000.0,
                           patch_size=settings.pretrain.patch_size)


def _case_input(case: CaseRecord, cache: Any) -> CaseInput:
    """Prompt embeddings of one case: T1 from its modality and region, T2 for each class the
    dataset annotates (for head and neck: primary tumour and lymph node), canonical wording."""
    classes = [case.label_map[label_id] for label_id in sorted(case.label_map)]
    context_text, target_texts = _prompt_texts(case.modality, case.region, case.sequence, classes)
    context = torch.as_tensor(np.asarray(cache.get(context_text)), dtype=torch.float32)
    targets = torch.stack([torch.as_tensor(np.asarray(cache.get(t)), dtype=torch.float32) for t in target_texts])
    return CaseInput(case=case.case, image_path=case.image, label_path=case.label, modality=case.modality,
                     context=context, targets=targets)


# Calls into the other packages, kept here so that the seams are visible in one place.

def _load_model(path: str | os.PathLike, device: torch.device, config: Mapping[str, Any]
                ) -> tuple[Any, str, dict[str, Any]]:
    """(model, the sha256 of the weights it was loaded from, ``config`` with the model's training window)."""
    from duplus.model import load_model, with_trained_window

    model, sidecar = load_model(path, device=str(device))  # checks the weights against the sidecar's sha256
    return model, str(sidecar["sha256"]), with_trained_window(config, sidecar)


def _prompt_texts(modality: str, region: str, sequence: str | None, classes: list[str]) -> tuple[str, list[str]]:
    from duplus.prompts.templates import context_prompt, target_prompts

    return (context_prompt(modality, region, sequence),
            [target_prompts(modality, name, sequence)[0] for name in classes])


def _load_prompt_cache(path: str | os.PathLike) -> Any:
    from duplus.prompts.cache import PromptCache

    return PromptCache.load(path)


def _sentence_encoder(config: Mapping[str, Any]) -> Callable[[list[str]], np.ndarray]:
    """The config's text encoder (``prompts.source``, ``prompts.pooling``), loaded once, as a
    function of a list of sentences."""
    from duplus.prompts.encoder import TextEncoder

    prompts = Settings.of(config).prompts
    # The constructor loads the model; a ``load`` factory is preferred where the class offers one.
    loader = getattr(TextEncoder, "load", TextEncoder)
    encoder = loader(prompts.source, prompts.pooling)
    batch_size = prompts.batch_size

    def encode(sentences: list[str]) -> np.ndarray:
        embeddings = encoder.encode(sentences, batch_size=batch_size)
        return embeddings.detach().cpu().numpy() if hasattr(embeddings, "detach") else np.asarray(embeddings)

    return encode
