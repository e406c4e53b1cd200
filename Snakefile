# DuPLUS pipeline: raw data -> preprocessed store -> prompt cache -> universal pretraining
# -> per-center LoRA and prognosis -> report. Each stage is one file in rules/.
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")  # --replace-workflow-config, used with config/paper.yaml

# This Snakefile and every job import the duplus library from this checkout, whatever environment
# runs them (the venv, or a conda environment from envs/duplus.yaml, which does not install it).
sys.path.insert(0, workflow.basedir)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (workflow.basedir, os.getenv("PYTHONPATH")) if p))

from duplus.data.registry import check_dataset_references, stringify_label_ids  # noqa: E402 - needs the path above

# The embedded demo config, found beside this file even when run with --directory elsewhere.
configfile: Path(workflow.basedir) / "config.yaml"


stringify_label_ids(config)  # YAML's `labels: {1: liver}` has integer keys; the schema expects strings
validate(config, "schemas/config.schema.yaml")
check_dataset_references(config)


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/preprocess.smk"
include: "rules/prompts.smk"
include: "rules/pretrain.smk"
include: "rules/evaluate.smk"
include: "rules/baseline.smk"
include: "rules/lora.smk"
include: "rules/prognosis.smk"
include: "rules/report.smk"


rule all:
    input:
        report_index(),
    default_target: True
