"""Each job's threads, memory, time limit, GPUs and stop signal, as the rules declare them from the config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from duplus.jobresources import GPU_RULES, cluster_plan_problems, job_resources, job_threads

ROOT = Path(__file__).resolve().parents[1]


def _config(*files: str, **resources) -> dict:
    config: dict = {}
    for name in files:
        for key, value in yaml.safe_load((ROOT / name).read_text(encoding="utf-8")).items():
            config[key] = value
    if resources:
        config.setdefault("resources", {}).update(resources)
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    return config


def _resolved(rule: str, config: dict, threads: int | None = None) -> dict:
    threads = job_threads(rule, config) if threads is None else threads
    return {key: value(None, threads) if callable(value) else value for key, value in job_resources(rule, config).items()}


def test_the_demo_asks_what_its_rules_asked_before() -> None:
    demo = _config("config.yaml")
    assert {rule: job_threads(rule, demo) for rule in demo["resources"]["jobs"]} == {
        "download": 1, "preprocess": 2, "cache_prompts": 1, "universal_pretrain": 1, "baseline_train": 1,
        "evaluate": 1, "baseline_evaluate": 1, "lora_center": 1, "prognosis": 1, "report": 1}
    memory = {rule: _resolved(rule, demo)["mem_mb"] for rule in demo["resources"]["jobs"]}
    assert memory == {"download": 2000, "preprocess": 8000, "cache_prompts": 4000, "universal_pretrain": 16000,
                      "baseline_train": 16000, "evaluate": 16000, "baseline_evaluate": 16000, "lora_center": 16000,
                      "prognosis": 8000, "report": 4000}
    assert all(_resolved(rule, demo)["gpu"] == 0 for rule in GPU_RULES)


def test_the_paper_config_asks_for_gpus_threads_and_the_stop_signal() -> None:
    paper = _config("config/paper.yaml")
    pretrain = _resolved("universal_pretrain", paper)
    assert job_threads("universal_pretrain", paper) == 8
    assert pretrain == {"runtime": 2880, "mem_mb": 64000, "gpu": 1, "slurm_extra": "--signal=TERM@120"}
    assert _resolved("lora_center", paper)["slurm_extra"] == "--signal=TERM@120"
    assert "slurm_extra" not in _resolved("evaluate", paper)
    assert job_threads("evaluate", paper) == 4
    assert job_threads("preprocess", paper) == 16 and _resolved("preprocess", paper)["mem_mb"] == 64000
    assert "gpu" not in _resolved("preprocess", paper)


def test_gpu_model_and_several_gpus() -> None:
    config = _config("config/paper.yaml", gpus=4, gpu_model="a100")
    assert job_threads("universal_pretrain", config) == 32
    assert _resolved("universal_pretrain", config)["gpu_model"] == "a100"
    assert "gpu_model" not in _resolved("download", config)


def test_every_rule_takes_its_own_entry() -> None:
    config = _config("config.yaml")
    declared = {}
    for smk in (ROOT / "rules").glob("*.smk"):
        for block in re.split(r"(?m)^(?=rule \w+:)", smk.read_text(encoding="utf-8")):
            name = re.match(r"rule (\w+):", block)
            if name and "threads:" in block:
                declared[name.group(1)] = (re.search(r'job_threads\("(\w+)"', block).group(1),
                                           re.search(r'job_resources\("(\w+)"', block).group(1))
    assert declared == {rule: (rule, rule) for rule in config["resources"]["jobs"]}


@pytest.fixture
def paper() -> dict:
    return _config("config/paper.yaml")


def _planned(rule: str, config: dict, **changes) -> tuple[str, int, dict]:
    resources = _resolved(rule, config)
    threads = changes.pop("threads", job_threads(rule, config))
    resources.update(changes)
    return rule, threads, resources


def test_a_plan_as_declared_has_no_problem(paper) -> None:
    planned = [_planned(rule, paper) for rule in paper["resources"]["jobs"]]
    assert cluster_plan_problems(planned, paper, cores=None) == []


def test_a_gpu_rule_without_its_gpu_is_named(paper) -> None:
    (problem,) = cluster_plan_problems([_planned("evaluate", paper, gpu=0)], paper, cores=None)
    assert problem.startswith("evaluate would be submitted with 0 GPUs") and "set-resources" in problem


def test_threads_capped_by_cores_are_named(paper) -> None:
    (problem,) = cluster_plan_problems([_planned("universal_pretrain", paper, threads=2)], paper, cores=2)
    assert "universal_pretrain would get 2 threads, not the 8" in problem and "--cores 2" in problem


def test_a_profiles_slurm_extra_without_the_signal_is_named(paper) -> None:
    (problem,) = cluster_plan_problems([_planned("lora_center", paper, slurm_extra="--qos=long")], paper, cores=None)
    assert "--signal=TERM@120" in problem and problem.startswith("lora_center")
    assert cluster_plan_problems([_planned("lora_center", paper, slurm_extra="--qos=long --signal=TERM@120")],
                                 paper, cores=None) == []
