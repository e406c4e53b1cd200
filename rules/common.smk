# The rules' input functions and path helpers (functions only, no rules): each binds the run's
# config to its namesake in duplus.workflow_inputs, where the logic lives and is tested.
from duplus import workflow_inputs
from duplus.jobresources import job_resources, job_threads  # noqa: F401 - the rules' threads and resources


def raw_dir():
    return workflow_inputs.raw_dir(config)


def preprocessed_dir():
    return workflow_inputs.preprocessed_dir(config)


def results():
    return workflow_inputs.results(config)


def log_dir():
    return workflow_inputs.log_dir(config)


def dataset_download_record(wildcards):
    return workflow_inputs.download_record(wildcards.dataset, config)


def user_dataset_index(wildcards):
    return workflow_inputs.user_dataset_index(wildcards.dataset, config)


def all_manifests(wildcards=None):
    return workflow_inputs.all_manifests(config)


def prompt_cache(wildcards=None):
    return workflow_inputs.prompt_cache(config)


def pretrained_model(wildcards=None):
    return workflow_inputs.pretrained_model(config)


def baseline_models(wildcards=None):
    return workflow_inputs.baseline_models(config)


def lora_metrics(wildcards=None):
    return workflow_inputs.lora_metrics(config)


def prognosis_inputs(wildcards=None):
    return workflow_inputs.prognosis_inputs(config)


def report_inputs(wildcards=None):
    return workflow_inputs.report_inputs(config)


def report_index():
    return workflow_inputs.report_index(config)


def tracked(stage):
    """The params of a job of ``stage``: the settings it depends on, for its wildcards."""

    def settings(wildcards):
        return workflow_inputs.tracked(stage, config, wildcards)

    return settings
