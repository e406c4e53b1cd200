# DuPLUS pipeline: raw data -> preprocessed store -> prompt cache -> universal pretraining
# -> per-center LoRA and prognosis -> report. Each stage is one file in rules/.
from pathlib import Path

from snakemake.utils import min_version, validate

from duplus.data.registry import stringify_label_ids

min_version("8.10")


# The embedded demo config, found beside this file even when run with --directory elsewhere.
configfile: Path(workflow.basedir) / "config.yaml"


stringify_label_ids(config)  # YAML's `labels: {1: liver}` has integer keys; the schema expects strings
validate(config, "schemas/config.schema.yaml")


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
