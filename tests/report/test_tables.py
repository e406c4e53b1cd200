"""Tables 1-4 from fake metrics: rounded values, baseline and published columns, published rows."""

import csv
import io

import pandas as pd

from duplus.report.inputs import load_inputs
from duplus.report.tables import (
    adaptation_per_class_tables,
    adaptation_table,
    efficiency_table,
    per_class_tables,
    prognosis_table,
    segmentation_table,
)


def _rows(table) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(table.to_csv())))


def test_segmentation_table_means_baseline_and_published(results):
    inputs = load_inputs(results)
    table = segmentation_table(inputs.summary, inputs.baseline_summary, published=True)
    rows = {r["dataset"]: r for r in _rows(table)}
    demo, btcv = rows["demo_abdomen_ct"], rows["btcv"]
    assert (demo["Dice"], demo["HD95 (mm)"], demo["NSD"]) == ("0.706", "12.3", "0.638")
    assert (demo["cases"], demo["classes"]) == ("4", "2")
    assert (btcv["Dice"], btcv["HD95 (mm)"], btcv["NSD"]) == ("0.889", "3.0", "0.812")
    # Baseline only where it was run.
    assert (btcv["baseline Dice"], btcv["baseline HD95 (mm)"], btcv["baseline NSD"]) == ("0.915", "1.8", "0.945")
    assert demo["baseline Dice"] == ""
    # Published values in their own marked columns; none for the synthetic demo.
    assert btcv["nnU-Net Dice (published)"] == "0.8308"
    assert btcv["Swin-UNETR Dice (published)"] == "0.7889"
    assert btcv["benchmark (published)"] == "BTCV"
    assert demo["nnU-Net Dice (published)"] == "" and demo["benchmark (published)"] == ""
    overall = rows["all datasets (mean)"]
    assert overall["Dice"] == f"{(0.70617 + 0.88888) / 2:.3f}" and overall["baseline Dice"] == ""
    # The baseline ran on btcv only: the two models are compared over btcv alone.
    shared = rows["datasets with a baseline (1, mean)"]
    assert (shared["Dice"], shared["baseline Dice"]) == ("0.889", "0.915")
    md = table.to_markdown()
    assert "nnU-Net Dice (published)" in md and "| demo_abdomen_ct |" in md
    assert "| — |" in md  # missing published value shown as a dash
    assert any("not measured here" in note for note in table.notes)
    tex = table.to_latex()
    assert "demo\\_abdomen\\_ct" in tex and "nnU-Net Dice (published)" in tex


def test_segmentation_table_without_published_or_baseline(results):
    inputs = load_inputs(results)
    table = segmentation_table(inputs.summary, None, published=False)
    headers = [c.title for c in table.columns]
    assert not any("published" in h or "baseline" in h for h in headers)
    assert not any("not measured here" in n for n in table.notes)


def test_per_class_tables_keep_inf_and_put_mean_last(results):
    inputs = load_inputs(results)
    tables = {t.name: t for t in per_class_tables(inputs.summary, inputs.baseline_summary)}
    assert set(tables) == {"table1_per_class_demo_abdomen_ct", "table1_per_class_btcv"}
    demo = _rows(tables["table1_per_class_demo_abdomen_ct"])
    assert [r["class"] for r in demo] == ["liver", "liver tumor", "mean"]
    assert demo[1]["HD95 (mm)"] == "inf"
    assert "baseline Dice" not in demo[0]
    btcv = _rows(tables["table1_per_class_btcv"])
    assert btcv[0]["baseline Dice"] == "0.930"


def test_adaptation_table(results):
    inputs = load_inputs(results)
    (row,) = _rows(adaptation_table(inputs.lora))
    assert row["adapter"] == "ct_siteB" and row["center"] == "siteB" and row["dataset"] == "demo_abdomen_ct"
    dice = (row["zero-shot Dice"], row["LoRA Dice"], row["full FT Dice"], row["gap closed"])
    assert dice == ("0.612", "0.801", "0.840", "0.829")
    params = (row["LoRA trainable params"], row["full FT trainable params"], row["LoRA share (%)"])
    assert params == ("25000", "1000000", "2.50")
    assert (row["adapter (MB)"], row["checkpoint (MB)"]) == ("0.10", "4.00")
    assert (row["LoRA time (s)"], row["full FT time (s)"]) == ("12.35", "20.00")
    assert (row["LoRA peak memory (MB)"], row["full FT peak memory (MB)"]) == ("900", "1101")
    (per_class,) = adaptation_per_class_tables(inputs.lora)
    assert [r["class"] for r in _rows(per_class)] == ["liver", "liver tumor"]
    assert _rows(per_class)[1]["LoRA Dice"] == "0.750"


def test_adaptation_tolerates_missing_fields():
    (row,) = _rows(adaptation_table({"x": {"center": "c", "dataset": "d", "lora_dice": 0.5}}))
    assert row["LoRA Dice"] == "0.500" and row["zero-shot Dice"] == "" and row["LoRA share (%)"] == ""
    assert adaptation_per_class_tables({"x": {"per_class": None}}) == []


def test_prognosis_table_order_measured_and_published_rows(results):
    inputs = load_inputs(results)
    table = prognosis_table(inputs.prognosis_summary, inputs.prognosis_folds, published=True)
    rows = _rows(table)
    assert [r["model"] for r in rows[:3]] == ["ehr_coxph", "ehr_rsf", "image_ehr_text"]
    assert rows[0]["Harrell C"] == "0.654 ± 0.043"
    assert rows[0]["IBS"] == "0.201 ± 0.012"
    assert rows[0]["source"] == "measured (2-fold CV)"
    published = {r["model"]: r for r in rows[3:]}
    assert published["HECKTOR 2022 best"]["Harrell C"] == "0.682"
    assert published["HECKTOR 2021 best"]["Harrell C"] == "0.720"
    assert published["DuPLUS (paper)"]["Harrell C"] == "0.69 ± 0.02"
    assert all(r["source"].startswith("published:") for r in published.values())
    assert any("ehr_mlp" in n and "image_mlp" in n for n in table.notes)  # models not in this run are named
    assert any("no events in center C" in n for n in table.notes)
    assert "0.69 $\\pm$ 0.02" in table.to_latex()


def test_efficiency_table_units_and_published_rows(results):
    inputs = load_inputs(results)
    rows = _rows(efficiency_table(inputs.efficiency, published=True))
    ours = rows[0]
    assert (ours["params (M)"], ours["MACs per window (G)"], ours["window"]) == ("1.23", "2.50", "32x32x32")
    cost = (ours["seconds per volume"], ours["peak memory (MB)"], ours["class-scaling ratio"])
    assert cost == ("1.23", "813", "1.08")
    assert ours["source"] == "measured"
    swin = next(r for r in rows if r["model"].startswith("Swin-UNETR"))
    assert (swin["params (M)"], swin["MACs per window (G)"], swin["window"]) == ("62.19", "321", "96x96x96")
    assert swin["source"].startswith("published:")
    assert len(_rows(efficiency_table(inputs.efficiency, published=False))) == 1


def test_a_switched_off_prognosis_stage_shows_no_measured_row(results):
    from duplus.prognosis.prognosis_stage import _write_disabled

    _write_disabled(results / "prognosis")
    assert load_inputs(results).prognosis_summary is None  # the section says "not found", no row of dashes


def test_a_model_with_undefined_folds_says_so_in_its_row():
    import math

    import pandas as pd

    metrics = {"harrell_c_mean": 0.6, "harrell_c_std": 0.1, "uno_c_mean": 0.6, "uno_c_std": 0.1,
               "ibs_mean": 0.2, "ibs_std": 0.01}
    summary = pd.DataFrame([{"model": "ehr_coxph", **metrics, "note": "harrell_c undefined in 1 of 3 folds"},
                            {"model": "ehr_rsf", **metrics, "note": math.nan}])
    folds = pd.DataFrame({"model": ["ehr_coxph"] * 3, "fold": [0, 1, 2], "harrell_c": [0.5, 0.6, math.nan]})
    rows = {r["model"]: r for r in _rows(prognosis_table(summary, folds, published=False))}
    assert rows["ehr_coxph"]["source"] == "measured (3-fold CV; harrell_c undefined in 1 of 3 folds)"
    assert rows["ehr_rsf"]["source"] == "measured (3-fold CV)"


def test_results_an_earlier_run_left_behind_are_not_this_runs(results):
    import json

    stale = results / "lora" / "old_center"
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text(json.dumps({"zero_shot_dice": 0.1}))
    everything = load_inputs(results)
    assert "old_center" in everything.lora and everything.prognosis_summary is not None
    center = {"dataset": "demo_abdomen_ct", "center": "siteB"}  # what the schema asks of a center
    config = {"lora": {"centers": {name: center for name in everything.lora if name != "old_center"}},
              "prognosis": {"enabled": False}, "baseline": {"enabled": False}}
    this_run = load_inputs(results, config)
    assert "old_center" not in this_run.lora and set(this_run.lora) == set(everything.lora) - {"old_center"}
    assert this_run.prognosis_summary is None and this_run.baseline_summary is None
    # Nor are they listed in the provenance as inputs of this report.
    assert not any("old_center" in str(p) or "prognosis" in p.parts or "baseline" in p.parts
                   for p in this_run.files)


def test_switched_off_lora_shows_no_adaptation(results):
    assert load_inputs(results).lora
    assert load_inputs(results, {"lora": {"enabled": False, "centers": {"ct_siteB": {"dataset": "demo_abdomen_ct",
                                                                                         "center": "siteB"}}}}).lora == {}


def test_per_class_tables_explain_the_dash(results):
    inputs = load_inputs(results)
    tables = per_class_tables(inputs.summary, inputs.baseline_summary) + adaptation_per_class_tables(inputs.lora)
    assert len(tables) == 3
    for table in tables:
        assert "A dash is a value that could not be computed." in table.notes, table.name
        assert "A dash is a value that could not be computed." in table.to_markdown()


def test_table1_notes_define_hd95_nsd_and_empty_masks(results):
    inputs = load_inputs(results)
    table = segmentation_table(inputs.summary, inputs.baseline_summary, published=True, nsd_tolerance_mm=3.0)
    per_class = per_class_tables(inputs.summary, inputs.baseline_summary, nsd_tolerance_mm=3.0)
    for notes in [table.notes] + [t.notes for t in per_class]:
        definitions = next(n for n in notes if n.startswith("Surfaces are area-weighted surface elements"))
        assert "the larger of the two directed 95th percentiles" in definitions
        assert "normalised surface Dice at a tolerance of 3 mm" in definitions
        assert "absent from both prediction and truth scores Dice 1, HD95 0 mm and NSD 1" in definitions
    # The published Dice says how its source computed it, including its different empty-class rule.
    assert any(n.startswith("Published mean Dice of nnU-Net Revisited") and "absent from both" in n
               for n in table.notes)
    unpublished = segmentation_table(inputs.summary, inputs.baseline_summary, published=False)
    assert not any(n.startswith("Published mean Dice") for n in unpublished.notes)


def test_prognosis_notes_give_each_published_c_index_its_definition(results):
    inputs = load_inputs(results)
    notes = prognosis_table(inputs.prognosis_summary, inputs.prognosis_folds, published=True).notes
    by_source = {n.split(":")[0]: n for n in notes if n.startswith("Published C-index of")}
    assert len(by_source) == 3
    assert "recurrence-free survival" in next(n for s, n in by_source.items() if "HECKTOR 2022" in s)
    assert "progression-free survival" in next(n for s, n in by_source.items() if "HECKTOR 2021" in s)
    assert "does not define it further" in next(n for s, n in by_source.items() if "DuPLUS" in s)


def test_an_ehr_only_run_is_marked_and_lists_no_image_model_as_missing(results):
    inputs = load_inputs(results)
    table = prognosis_table(inputs.prognosis_summary, inputs.prognosis_folds, published=False, ehr_only=True)
    assert table.title == "Table 3. Survival prognosis (recurrence-free survival, EHR only)"
    assert table.notes[0].startswith("EHR only: the cohort's clinical table without images")
    missing = next(n for n in table.notes if n.startswith("Not in this run"))
    assert "ehr_text" in missing and "image" not in missing
    plain = prognosis_table(inputs.prognosis_summary, inputs.prognosis_folds, published=False)
    assert "EHR only" not in plain.title and not any(n.startswith("EHR only") for n in plain.notes)


def test_prognosis_table_shows_bootstrap_intervals_split_and_cohort_warnings(results):
    inputs = load_inputs(results)
    summary = inputs.prognosis_summary.assign(harrell_c_ci_low=0.6012, harrell_c_ci_high=0.7049,
                                              uno_c_ci_low=float("nan"), uno_c_ci_high=float("nan"))
    cohort = {"stratified_by": "center (leave-one-center-out: CHUM, CHUP)",
              "warnings": ["EHR table t.csv, column 'relapse': 2 event(s) for 5 folds: some test folds have none"]}
    table = prognosis_table(summary, inputs.prognosis_folds, published=False, cohort=cohort)
    row = _rows(table)[0]
    assert row["Harrell C"] == "0.654 ± 0.043 [0.601, 0.705]"
    assert row["Uno C"] == "0.640 ± 0.050"                  # no interval: the mean and spread alone
    assert any("bootstrap 95 % interval" in n for n in table.notes)
    assert "Folds: center (leave-one-center-out: CHUM, CHUP)." in table.notes
    assert any(n.startswith("Cohort warning: EHR table t.csv, column 'relapse'") for n in table.notes)


def test_time_dependent_auc_table_per_horizon():
    from duplus.report.tables import auc_table

    auc = pd.DataFrame({"model": ["ehr_rsf", "ehr_rsf", "ehr_coxph", "ehr_coxph", "ehr_coxph"],
                        "fold": [0, 1, 0, 1, 0], "horizon": [12.0, 12.0, 12.0, 12.0, 36.0],
                        "auc": [0.7, 0.8, 0.6, float("nan"), float("nan")], "note": ""})
    table = auc_table(auc, "time (months)")
    rows = _rows(table)
    assert [r["model"] for r in rows] == ["ehr_coxph", "ehr_rsf"]
    assert rows[0]["AUC at 12"] == "0.600" and rows[1]["AUC at 12"] == "0.750 ± 0.071"
    assert not rows[0]["AUC at 36"]                      # no fold covers 36
    assert auc_table(pd.DataFrame(columns=["model", "fold", "horizon", "auc"])) is None


def test_prognosis_notes_name_the_scan_of_each_block_of_image_features(results):
    inputs = load_inputs(results)
    cohort = {"image_blocks": [{"dataset": "hecktor2022_ct", "modality": "CT", "first_column": 0, "columns": 641},
                               {"dataset": "hecktor2022_pet", "modality": "PET", "first_column": 641, "columns": 641}]}
    notes = prognosis_table(inputs.prognosis_summary, inputs.prognosis_folds, published=False, cohort=cohort).notes
    assert ("Image features: the pretrained network's bottleneck (mean over the image, mean over the tumour, log "
            "tumour volume) of hecktor2022_ct (CT, 641 values) and hecktor2022_pet (PET, 641 values), one block per "
            "scan concatenated per patient.") in notes
    plain = prognosis_table(inputs.prognosis_summary, inputs.prognosis_folds, published=False).notes
    assert not any(n.startswith("Image features") for n in plain)


def test_a_center_adapted_on_several_scans_gets_a_row_per_scan():
    metrics = {"center": "hecktor_chup", "site": "CHUP", "dataset": "hecktor2022_ct + hecktor2022_pet",
               "per_class": {"primary tumor": {"zero_shot": 0.4, "lora": 0.6, "full_ft": 0.65}},
               "per_dataset": {"hecktor2022_ct": {"zero_shot": 0.3, "lora": 0.5, "full_ft": 0.55},
                               "hecktor2022_pet": {"zero_shot": 0.5, "lora": 0.7, "full_ft": 0.75}}}
    (row,) = _rows(adaptation_table({"hecktor_chup": metrics}))
    assert row["dataset"] == "hecktor2022_ct + hecktor2022_pet" and row["center"] == "CHUP"
    (per_class,) = adaptation_per_class_tables({"hecktor_chup": metrics})
    assert [(r["class"], r["LoRA Dice"]) for r in _rows(per_class)] == [
        ("primary tumor", "0.600"), ("all classes, hecktor2022_ct", "0.500"), ("all classes, hecktor2022_pet", "0.700")]
