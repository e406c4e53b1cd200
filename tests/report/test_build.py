"""run_report end to end on fake metrics: files, determinism, missing stages, links that resolve."""

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from duplus.errors import DataError
from duplus.report.build import run_report

from .conftest import PROGNOSIS_SUMMARY, SUMMARY, make_config, write_results


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])


def _links(index: Path) -> _Links:
    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict:
    """One report over every stage's metrics, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("full")
    results = write_results(root / "results")
    config = make_config(root)
    out = root / "report"
    return {"root": root, "results": results, "config": config, "out": out,
            "written": run_report(config, results, out)}


def test_full_report_writes_every_table_figure_and_index_last(full):
    out, written = full["out"], full["written"]
    assert written[-1] == out / "index.html"
    assert out / "provenance.json" in written
    names = {p.name for p in written}
    for stem in ("table1_segmentation", "table1_per_class_btcv", "table1_per_class_demo_abdomen_ct",
                 "table2_adaptation", "table2_per_class_ct_siteB", "table3_prognosis", "table4_efficiency"):
        assert {f"{stem}.md", f"{stem}.csv", f"{stem}.tex"} <= names
    for stem in ("training_curve", "dice_box_demo_abdomen_ct", "dice_box_btcv", "overlay_demo_abdomen_ct",
                 "lora_comparison", "km_curves", "class_scaling"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert set(_snapshot(out)) == {str(p.relative_to(out)) for p in written}  # no temporaries left behind
    assert "0.8308" in (out / "tables/table1_segmentation.md").read_text(encoding="utf-8")
    assert b"CreationDate" not in (out / "figures/km_curves.pdf").read_bytes()


def test_index_embeds_its_figures_and_links_only_existing_files(full):
    out = full["out"]
    links = _links(out / "index.html")
    # Figures are inside the page (snakemake --report embeds index.html alone), each one a PNG written.
    assert len(links.images) == 7 and all(src.startswith("data:image/png;base64,") for src in links.images)
    pngs = {p.read_bytes() for p in (out / "figures").glob("*.png")}
    assert {base64.b64decode(src.split(",", 1)[1]) for src in links.images} <= pngs
    local = [h for h in links.links if not h.startswith("#")]
    assert not [h for h in local if "://" in h or h.startswith("/")], "the page must only use relative paths"
    assert [h for h in local if not (out / h).is_file()] == []
    assert {"provenance.json", "tables/table3_prognosis.tex", "figures/km_curves.pdf"} <= set(local)
    html = (out / "index.html").read_text(encoding="utf-8")
    for table in ("table1_segmentation", "table2_adaptation", "table3_prognosis", "table4_efficiency"):
        assert f'<table id="{table}">' in html
    assert "(published)" in html and 'class="published"' in html
    assert "<script" not in html


def test_second_run_is_byte_identical(full, tmp_path):
    run_report(full["config"], full["results"], tmp_path / "again")
    first, second = _snapshot(full["out"]), _snapshot(tmp_path / "again")
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_missing_prognosis_is_a_note_and_its_stale_outputs_go(full, tmp_path):
    results, out = tmp_path / "results", tmp_path / "report"
    shutil.copytree(full["results"], results)
    shutil.copytree(full["out"], out)
    shutil.rmtree(results / "prognosis")
    written = run_report(full["config"], results, out)
    assert not any(p.name.startswith(("table3", "km_curves")) for p in written)
    assert not (out / "tables/table3_prognosis.csv").exists()
    assert not (out / "figures/km_curves.png").exists()
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "Prognosis metrics not found (prognosis/summary.csv): stage disabled or not run." in html
    assert "table3_prognosis" not in html
    links = _links(out / "index.html")
    assert [h for h in links.links if not h.startswith("#") and not (out / h).is_file()] == []


def test_empty_results_still_give_a_page(config, tmp_path):
    config["prognosis"]["enabled"] = False
    out = tmp_path / "report"
    written = run_report(config, tmp_path / "nothing", out)
    assert [p.name for p in written] == ["provenance.json", "index.html"]
    html = (out / "index.html").read_text(encoding="utf-8")
    for stage in ("Pretraining log", "Segmentation metrics", "LoRA metrics", "Prognosis metrics", "Efficiency metrics"):
        assert f"{stage} not found" in html
    assert "stage disabled in the config" in html
    assert _links(out / "index.html").images == []


def test_published_values_can_be_turned_off(config, tmp_path):
    results = tmp_path / "results"
    (results / "evaluate/universal").mkdir(parents=True)
    (results / "prognosis").mkdir()
    (results / "evaluate/universal/summary.csv").write_text(SUMMARY)
    (results / "prognosis/summary.csv").write_text(PROGNOSIS_SUMMARY)
    config["report"]["published"] = False
    run_report(config, results, tmp_path / "report")
    assert "published" not in (tmp_path / "report/tables/table1_segmentation.csv").read_text(encoding="utf-8")
    assert "HECKTOR" not in (tmp_path / "report/tables/table3_prognosis.md").read_text(encoding="utf-8")
    assert 'class="published"' not in (tmp_path / "report/index.html").read_text(encoding="utf-8")


def test_broken_example_is_skipped_with_a_note(config, tmp_path):
    examples = tmp_path / "results/evaluate/universal/examples"
    examples.mkdir(parents=True)
    (examples / "broken.npz").write_bytes(b"not an npz")
    (examples.parent / "summary.csv").write_text(SUMMARY)
    written = run_report(config, tmp_path / "results", tmp_path / "report")
    assert not any(p.suffix == ".png" for p in written)
    html = (tmp_path / "report/index.html").read_text(encoding="utf-8")
    assert "Figure skipped (broken: prediction (solid) vs ground truth (dashed))" in html
    assert "broken.npz" in html


def test_malformed_metrics_name_the_file(config, tmp_path):
    path = tmp_path / "results/evaluate/universal/summary.csv"
    path.parent.mkdir(parents=True)
    path.write_text("dataset,dice\nx,0.5\n")
    with pytest.raises(DataError, match=r"summary\.csv: missing column"):
        run_report(config, tmp_path / "results", tmp_path / "report")


def test_km_without_risk_groups_says_why_not_that_the_file_is_missing(full, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(full["results"], results)
    (results / "prognosis/km.json").write_text("{}")       # what an all-censored cohort leaves
    written = run_report(full["config"], results, tmp_path / "report")
    assert not any(p.name.startswith("km_curves") for p in written)
    html = (tmp_path / "report/index.html").read_text(encoding="utf-8")
    assert "prognosis/km.json has no risk groups (no model could be fitted on any fold" in html
    assert "Kaplan-Meier curves not found" not in html


def test_disabled_baseline_is_listed_as_not_in_the_report(full, tmp_path):
    config = {**full["config"], "baseline": {"enabled": False}}
    run_report(config, full["results"], tmp_path / "report")
    html = (tmp_path / "report/index.html").read_text(encoding="utf-8")
    assert ("Baseline metrics not found (evaluate/baseline/summary.csv): stage disabled in the config; "
            "Table 1 has no baseline columns.") in html
    assert "Baseline metrics not found" not in (full["out"] / "index.html").read_text(encoding="utf-8")


def test_table3_names_the_configured_endpoint(full, tmp_path):
    assert "Table 3. Survival prognosis (recurrence-free survival)" in \
        (full["out"] / "tables/table3_prognosis.md").read_text(encoding="utf-8")
    config = {**full["config"], "prognosis": {**full["config"]["prognosis"], "endpoint": "overall survival"}}
    run_report(config, full["results"], tmp_path / "report")
    assert "**Table 3. Survival prognosis (overall survival)**" in \
        (tmp_path / "report/tables/table3_prognosis.md").read_text(encoding="utf-8")
    assert "Table 3. Survival prognosis (overall survival)" in (tmp_path / "report/index.html").read_text(encoding="utf-8")


def test_table1_notes_name_the_configured_nsd_tolerance(full, tmp_path):
    assert "at a tolerance of 2 mm" in (full["out"] / "tables/table1_segmentation.md").read_text(encoding="utf-8")
    config = {**full["config"], "evaluate": {"nsd_tolerance_mm": 1.5}}
    run_report(config, full["results"], tmp_path / "report")
    for name in ("table1_segmentation.md", "table1_per_class_btcv.md"):
        text = (tmp_path / "report/tables" / name).read_text(encoding="utf-8")
        assert "at a tolerance of 1.5 mm" in text and "2 mm" not in text, name


def test_prognosis_section_shows_auc_calibration_intervals_and_cohort_warnings(tmp_path):
    results = write_results(tmp_path / "results")
    prognosis = results / "prognosis"
    summary = pd.read_csv(prognosis / "summary.csv").assign(harrell_c_ci_low=0.61, harrell_c_ci_high=0.7)
    summary.to_csv(prognosis / "summary.csv", index=False)
    (prognosis / "auc.csv").write_text("model,fold,horizon,auc,note\nehr_coxph,0,12,0.7,\nehr_coxph,1,12,0.8,\n")
    (prognosis / "calibration.json").write_text(json.dumps(
        {"horizon": 12, "models": {"ehr_coxph": {"predicted": [0.3, 0.6], "observed": [0.35, 0.55], "n": [5, 5]}}}))
    (prognosis / "cohort.json").write_text(json.dumps(
        {"warnings": ["EHR table t.csv has no event (column 'relapse' is 0 for all 24 patients)"]}))
    out = tmp_path / "report"
    names = {p.name for p in run_report(make_config(tmp_path), results, out)}
    assert {"table3b_time_auc.md", "calibration.png", "calibration.pdf"} <= names
    table3 = (out / "tables/table3_prognosis.md").read_text(encoding="utf-8")
    assert "0.654 ± 0.043 [0.610, 0.700]" in table3
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "Cohort warning: EHR table t.csv has no event (column &#39;relapse&#39; is 0" in html
    assert "Table 3b. Time-dependent AUC (time (rfs_months))" in html  # the schema's prognosis.ehr.time
