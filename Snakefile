# DuPLUS pipeline: raw data -> preprocessed store -> prompt cache -> universal pretraining
# -> per-center LoRA and prognosis -> report. Each stage is one file in rules/.
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")  # --replace-workflow-config, used with config/paper.yaml

# This Snakefile and every job import the duplus library from this checkout, whatever environment
# runs them (the venv, or a conda environment from envs/duplus.yaml, which does not install it).
sys.path.insert(0, workflow.basedir)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (workflow.basedir, os.getenv("PYTHONPATH")) if p))

from duplus.configcheck import check_config, schema_error  # noqa: E402 - needs the path above
from duplus.data.registry import drop_removed_entries, stringify_label_ids  # noqa: E402
from duplus.errors import ConfigError  # noqa: E402
from duplus.jobresources import cluster_plan_problems  # noqa: E402


# The embedded demo config, found beside this file even when run with --directory elsewhere.
configfile: Path(workflow.basedir) / "config.yaml"


# `datasets: {demo_abdomen_mri: null}` in a merged --configfile takes that dataset out of the run.
for removed in drop_removed_entries(config):
    print(f"config: {removed} set to null, left out of this run", file=sys.stderr)
stringify_label_ids(config)  # YAML's `labels: {1: liver}` has integer keys; the schema expects strings
try:
    validate(config, "schemas/config.schema.yaml")  # also fills in the schema's defaults
except WorkflowError as error:
    raise (schema_error(error, getattr(workflow, "configfiles", ())) or error) from None
try:
    check_config(config)  # datasets, data roots and references: before any job is planned
except ConfigError as error:
    # The message names the key; the library frames under it would only push it out of sight.
    raise error.with_traceback(None) from None


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
    default_target: True
    input:
        report_index(),


# Before the first sbatch: a profile (a site's own, or --cores / set-resources given to this run)
# can still take from a job what the config declares for it; stop and say what to change rather
# than queue a GPU rule without its GPU or with a handful of threads.
onstart:
    if not workflow.local_exec:
        planned = [(job.rule.name, job.threads, job.resources) for job in workflow.dag.needrun_jobs() if not job.is_local]
        problems = cluster_plan_problems(planned, config, workflow.resource_settings.cores)
        if problems:
            print("Stopped before submitting any job: " + "; ".join(problems), file=sys.stderr)
            sys.exit(1)
