"""Config validation: a schema violation stops the run before any job, and the error names the key.

Expectation "config-rejected-early": every hand-picked violation below, and wrong-typed values put
at random typed keys, make ``snakemake.utils.validate`` (what the Snakefile calls on load) raise,
with the offending key in the message. One real ``snakemake -n`` shows the same from the command
line: a non-zero exit, the key named, no job scheduled and nothing written.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from reliability_helpers import ROOT, SCHEMA, SNAKEMAKE, child_env, tiny_config

SCHEMA_DATA = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def valid_config() -> dict[str, Any]:
    return tiny_config()


def set_key(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``config`` with ``dotted`` (``a.b.c``) set to ``value``."""
    result = copy.deepcopy(config)
    node = result
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return result


def rejection(config: dict[str, Any]) -> str:
    """The validation error's message; AssertionError when the config is accepted."""
    from snakemake.utils import validate

    try:
        validate(copy.deepcopy(config), str(SCHEMA))
    except Exception as error:  # noqa: BLE001 - Snakemake raises WorkflowError; the message is what counts
        return str(error)
    raise AssertionError("the config was accepted")


# (dotted key, bad value, word the message must contain)
VIOLATIONS = [
    ("pretrain.stepz", 3, "stepz"),
    ("pretrian", {"steps": 3}, "pretrian"),
    ("pretrain.steps", "many", "steps"),
    ("pretrain.steps", 0, "steps"),
    ("pretrain.steps", 2.5, "steps"),
    ("pretrain.steps", True, "steps"),
    ("pretrain.patch_size", [128, 128], "patch_size"),
    ("pretrain.patch_size", [4, 4, 4], "patch_size"),
    ("pretrain.lr", 0, "lr"),
    ("pretrain.amp", "fp8", "amp"),
    ("pretrain.exclude_centers", {"demo_abdomen_ct": "siteB"}, "exclude_centers"),
    ("preprocess.spacing", [0, 1, 1], "spacing"),
    ("preprocess.spacing", "1.5", "spacing"),
    ("preprocess.percentiles", [2, 120], "percentiles"),
    ("preprocess.test_fraction", 1.0, "test_fraction"),
    ("device", "gpu", "device"),
    ("seed", 1.5, "seed"),
    ("model.preset", "huge", "preset"),
    ("datasets", {}, "datasets"),
    ("datasets.mine", {"kind": "zip", "root": "/data"}, "kind"),
    ("datasets.mine", {"kind": "msd", "labels": {"one": "liver"}}, "labels"),
    ("datasets.mine", {"kind": "msd", "modality": "X-ray"}, "modality"),
    ("datasets.mine", {"kind": "msd", "rooot": "/data"}, "rooot"),
    ("prompts.encoder", "../../etc/passwd", "encoder"),
    ("prompts.pooling", "max", "pooling"),
    ("prompts.batch_size", 0, "batch_size"),
    ("inference.overlap", 0.99, "overlap"),
    ("inference.blend", "median", "blend"),
    ("evaluate.split", "validation", "split"),
    ("lora.centers.x", {"dataset": "demo_abdomen_ct"}, "center"),
    ("lora.targets", [], "targets"),
    ("lora.targets", ["everything"], "targets"),
    ("lora.rank", 0, "rank"),
    ("prognosis.folds", 1, "folds"),
    ("prognosis.merge", ["image"], "merge"),
    ("prognosis.ehr.allow_unmatched", "no", "allow_unmatched"),
    ("prognosis.ehr.numeric", "age", "numeric"),
    ("resources.gpus", -1, "gpus"),
    ("report.published", "yes", "published"),
    ("paths.raw", 3, "raw"),
    ("paths.cache", "x", "cache"),
]


@pytest.mark.parametrize("dotted, value, word", VIOLATIONS, ids=[f"{d}={v!r}" for d, v, _ in VIOLATIONS])
def test_schema_violation_is_rejected_naming_the_key(dotted: str, value: Any, word: str,
                                                     valid_config: dict[str, Any]) -> None:
    message = rejection(set_key(valid_config, dotted, value))
    assert word in message, f"the error does not name '{word}':\n{message[:800]}"


def test_valid_config_is_accepted(valid_config: dict[str, Any]) -> None:
    """The baseline of every case above: without the violation the config passes."""
    with pytest.raises(AssertionError, match="accepted"):
        rejection(valid_config)


# --- generated wrong types -----------------------------------------------------------------------

def typed_leaves(schema: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, set[str]]]:
    """(dotted key, allowed JSON types) of every schema property that declares a type."""
    for name, sub in (schema.get("properties") or {}).items():
        if "$ref" in sub:
            sub = {**SCHEMA_DATA["$defs"][sub["$ref"].split("/")[-1]], **sub}
        dotted = f"{prefix}{name}"
        kind = sub.get("type")
        if kind == "object" and "properties" in sub:
            yield from typed_leaves(sub, dotted + ".")
        elif kind is not None:
            yield dotted, set(kind if isinstance(kind, list) else [kind])


LEAVES = sorted(typed_leaves(SCHEMA_DATA))
VALUES_BY_TYPE: dict[str, st.SearchStrategy] = {
    "string": st.text(min_size=1, max_size=5),
    "integer": st.integers(-3, 3),
    "number": st.floats(-5, 5, allow_nan=False).filter(lambda v: not float(v).is_integer()),
    "boolean": st.booleans(),
    "array": st.lists(st.integers(0, 3), max_size=2),
    "object": st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=1),
    "null": st.none(),
}


@st.composite
def wrong_types(draw: st.DrawFn) -> tuple[str, Any]:
    dotted, allowed = draw(st.sampled_from(LEAVES))
    wrong = set(VALUES_BY_TYPE) - allowed
    if "number" in allowed:
        wrong.discard("integer")  # an integer is a valid number (the reverse does not hold)
    wrong = sorted(wrong)
    kind = draw(st.sampled_from(wrong))
    return dotted, draw(VALUES_BY_TYPE[kind])


@settings(max_examples=25, deadline=None, database=None)
@given(case=wrong_types())
def test_generated_wrong_type_is_rejected_naming_the_key(case: tuple[str, Any], valid_config: dict[str, Any]) -> None:
    dotted, value = case
    message = rejection(set_key(valid_config, dotted, value))
    leaf = dotted.split(".")[-1]
    assert leaf in message, f"{dotted}={value!r}: the error does not name '{leaf}':\n{message[:800]}"


# --- the command line --------------------------------------------------------------------------------

def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  patch_size: [128, 128]\nlora:\n  rank: 0\n")
    result = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path / "work"), "--configfile",
         str(ROOT / "config.yaml"), str(bad), "--cores", "1", "-n", "all"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env=child_env(), timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "patch_size" in output, output[-2000:]
    assert "rule download" not in output and "Job stats" not in output, "jobs were scheduled"
    work = tmp_path / "work"
    created = {p.name for p in work.iterdir()} if work.exists() else set()
    assert not created & {"data", "results", "logs"}, f"files were written: {created}"


def test_a_dataset_mistake_stops_the_dry_run_in_one_line(tmp_path: Path) -> None:
    """Dataset settings are checked when the Snakefile is read, not in the download job a cluster
    queued; schema errors come as one line naming the key and the config files."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("datasets:\n  mine:\n    kind: csv\n    root: cases.csv\n    modality: CT\n"
                    "    region: abdomen\n    labels: {0: background, 1: livr}\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("pretrian:\n  steps: 3\n")
    for extra, expected in ((mine, "datasets.mine.labels.1: 'livr' is not a known class"),
                            (typo, "config: Additional properties are not allowed ('pretrian' was unexpected)")):
        result = subprocess.run(
            [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path / "work"), "--configfile",
             str(ROOT / "config.yaml"), str(extra), "--cores", "1", "-n", "all"],
            capture_output=True, text=True, encoding="utf-8", errors="replace", env=child_env(), timeout=300,
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0 and expected in output, output[-2000:]
        assert str(extra) in output or "livr" in expected, output[-2000:]  # the schema error names the files
        assert "Job stats" not in output and len(output.splitlines()) < 30, output[-2000:]
        # One line, like a schema error: no frames of the library under the message.
        assert "configcheck.py" not in output and "registry.py" not in output, output[-2000:]


def test_a_merged_configfile_takes_a_demo_dataset_out_with_null(tmp_path: Path) -> None:
    override = tmp_path / "mine.yaml"
    override.write_text("datasets:\n  demo_abdomen_ct: null\nlora:\n  centers:\n    ct_siteB: null\n"
                        "pretrain:\n  exclude_centers:\n    demo_abdomen_ct: null\n")
    result = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path / "work"), "--configfile",
         str(ROOT / "config.yaml"), str(override), "--cores", "1", "-n", "all"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env=child_env(), timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert "datasets.demo_abdomen_ct set to null, left out of this run" in output
    assert "data/raw/demo_abdomen_mri/download.json" in output and "demo_abdomen_ct/" not in output
