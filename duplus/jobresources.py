"""What one job of each rule asks the scheduler for: threads, memory, time limit, GPUs, stop signal.

The numbers are the config's ``resources`` section (defaults in schemas/config.schema.yaml), and
the rules take them from here. They live with the workflow, not in a profile's ``set-resources``,
because Snakemake users keep cluster profiles per site (``~/.config/snakemake/slurm``: executor,
partition, account) and expect a workflow to declare what its jobs need: a site's own profile then
plans the same jobs as the repository's, and a GPU rule cannot lose its GPU to a profile that
never heard of it. ``cluster_plan_problems`` checks a planned run against these numbers, for what a
profile can still override (``set-resources``, ``set-threads``, ``cores``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

# The rules that run the network: on GPUs when resources.gpus > 0, else on the CPU.
GPU_RULES = ("universal_pretrain", "baseline_train", "evaluate", "baseline_evaluate", "lora_center", "prognosis")


def _job(rule: str, config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config["resources"]["jobs"][rule]


def _gpus(rule: str, config: Mapping[str, Any]) -> int:
    return int(config["resources"]["gpus"]) if rule in GPU_RULES else 0


def job_threads(rule: str, config: Mapping[str, Any]) -> int:
    """Threads of one job: cpus_per_gpu x gpus for a GPU rule given GPUs, else the entry's threads."""
    gpus = _gpus(rule, config)
    job = _job(rule, config)
    return int(job["cpus_per_gpu"]) * gpus if gpus else int(job["threads"])


def job_resources(rule: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The rule's Snakemake resources (names as the SLURM executor reads them).

    ``gpu`` is declared on every GPU rule (0 without GPUs), so that a local run's ``--resources
    gpu=N`` keeps GPU jobs from sharing a GPU; CPU rules declare none.
    """
    job = _job(rule, config)
    resources: dict[str, Any] = {"runtime": int(job["runtime"])}
    if "mem_mb_per_thread" in job:
        per_thread = int(job["mem_mb_per_thread"])
        # The threads the job really gets (a local run caps them at --cores), so memory follows the workers.
        resources["mem_mb"] = _per_thread_memory(per_thread)
    else:
        resources["mem_mb"] = int(job["mem_mb"])
    if rule in GPU_RULES:
        gpus = _gpus(rule, config)
        resources["gpu"] = gpus
        model = config["resources"].get("gpu_model")
        if gpus and model:
            resources["gpu_model"] = model
    if job.get("term_signal_s"):
        resources["slurm_extra"] = term_signal_option(int(job["term_signal_s"]))
    return resources


def _per_thread_memory(per_thread: int) -> Callable[..., int]:
    def mem_mb(wildcards: Any, threads: int) -> int:
        return per_thread * threads

    return mem_mb


def term_signal_option(seconds: int) -> str:
    """The sbatch option that has SLURM send SIGTERM ``seconds`` before the time limit (and on preemption)."""
    return f"--signal=TERM@{seconds}"


def cluster_plan_problems(planned: Iterable[tuple[str, int, Mapping[str, Any]]], config: Mapping[str, Any],
                          cores: int | None) -> list[str]:
    """Where jobs about to be submitted to a cluster differ from what the config declares.

    ``planned``: (rule, threads, resources) of each job that will be submitted (local rules left
    out); ``cores``: the run's --cores (from the command line or any profile), which Snakemake
    applies as a cap on every job's threads. One line per rule, each saying what to change.
    """
    problems: dict[str, str] = {}
    for rule, threads, resources in planned:
        if rule in problems or rule not in config["resources"]["jobs"]:
            continue
        wanted_gpus = _gpus(rule, config)
        given_gpus = int(resources.get("gpu") or 0)
        if wanted_gpus and given_gpus < wanted_gpus and "gpu" not in str(resources.get("gres") or ""):
            problems[rule] = (f"{rule} would be submitted with {given_gpus} GPUs, but resources.gpus is {wanted_gpus}: "
                              f"remove `gpu` for {rule} from the profile's set-resources")
            continue
        wanted_threads = job_threads(rule, config)
        if threads < wanted_threads:
            cause = (f"--cores {cores} (a profile's `cores:` or the command line) caps every job's threads"
                     if cores is not None and cores < wanted_threads else "a profile's set-threads lowers them")
            problems[rule] = (f"{rule} would get {threads} threads, not the {wanted_threads} the config asks for: "
                              f"{cause}; remove it for cluster runs")
            continue
        signal = _job(rule, config).get("term_signal_s")
        if signal and term_signal_option(int(signal)) not in str(resources.get("slurm_extra") or ""):
            problems[rule] = (f"{rule} would be submitted without {term_signal_option(int(signal))} (a profile's "
                              f"slurm_extra replaces the workflow's): add it to that slurm_extra")
    return list(problems.values())
