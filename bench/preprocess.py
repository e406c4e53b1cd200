"""Seconds per case and voxels/s of preprocessing one large CT to 1.5 mm: duplus vs nnU-Net v2, side by side.

A synthetic abdominal CT (HU, int16, 512x512x200 at 0.8x0.8x2.5 mm, RAS-stored like most converted NIfTI, with a
scanner table, a circular reconstruction field and a 5-class label) is written once as NIfTI. Then each variant runs
in its own child process, pinned to the same cores with the same thread limits:

- ``duplus``: ``duplus.data.preprocess.process_case``, the per-case function of the pipeline's preprocess stage
  (read NIfTI, reorient, resample, body crop, normalise, write the array store and its metadata);
- ``nnunet``: nnU-Net v2's ``DefaultPreprocessor.run_case_save`` (``run_case`` timed inside it) on a one-case
  nnU-Net dataset fingerprinted and planned by nnU-Net's own API with a 1.5 mm ``3d_fullres`` target spacing.
  It runs when ``nnunetv2`` imports in this interpreter or in the one given with ``--nnunet-python``.

Peak RSS is each child's own high-water mark (``wait4``). A forked child starts from its parent's high-water mark,
so the parent stays small: it imports only the standard library and generates the phantom in a child too.
Prints one JSON object to stdout; progress goes to stderr.

    .venv/bin/python bench/preprocess.py --threads 2 --nnunet-python /path/to/nnunet/bin/python \
        > bench/results/preprocess-cpu2.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library at module level: children run under other interpreters (nnU-Net's has no duplus), and
# nnU-Net's spawned workers re-import this file as their main module.

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID:03d}_DuplusBench"
CASE = "bench_001"
LABELS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen", 5: "liver tumor"}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "BLOSC_NTHREADS")


def log(message: str) -> None:
    print(f"[bench/preprocess] {message}", file=sys.stderr, flush=True)


def versions(names: list[str]) -> dict[str, str | None]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------------------- phantom

def make_phantom(folder: Path, size: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> dict:
    """Write ``imagesTr/<case>_0000.nii.gz`` and ``labelsTr/<case>.nii.gz``: an nnU-Net raw layout, read by both."""
    import numpy as np
    import SimpleITK as sitk

    from duplus.demo.abdomen import CT_SCANNERS, LABEL_OF_TISSUE, abdomen_anatomy, render_ct
    from duplus.demo.phantoms import Grid

    rng = np.random.default_rng(seed)
    grid = Grid(size, spacing, "RAS")
    tissue, label = abdomen_anatomy(grid, rng, tumors=True)
    image = render_ct(tissue, grid, "siteB", rng)  # contrast-enhanced scanner: HU with noise and blur
    volume = sitk.GetArrayFromImage(image)
    x, y, _ = grid.points()
    # A curved carbon-fibre table under the patient (a detached dense structure the body mask must drop) ...
    table_top = 130.0 - 0.0006 * x[0] ** 2
    table = (y[0] >= table_top) & (y[0] <= table_top + 12.0) & (np.abs(x[0]) <= 230.0)
    shell = table & ((y[0] <= table_top + 2.0) | (y[0] >= table_top + 10.0))
    noise = rng.normal(0.0, CT_SCANNERS["siteB"]["noise"], volume.shape[1:]).astype(np.float32)
    volume[:, table] = np.clip(-250.0 + noise[table], -1024, 3071).astype(np.int16)
    volume[:, shell] = np.clip(350.0 + noise[shell], -1024, 3071).astype(np.int16)
    # ... and the scanner's circular reconstruction field: outside it the stored value is the -1024 padding.
    outside = (x[0] ** 2 + y[0] ** 2) > (0.5 * size[0] * spacing[0]) ** 2
    volume[:, outside] = -1024
    out = sitk.GetImageFromArray(volume)
    out.CopyInformation(image)
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(image)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    image_path, label_path = folder / "imagesTr" / f"{CASE}_0000.nii.gz", folder / "labelsTr" / f"{CASE}.nii.gz"
    sitk.WriteImage(out, str(image_path), useCompression=True)
    sitk.WriteImage(sitk.Cast(label_image, sitk.sitkUInt8), str(label_path), useCompression=True)
    labels = {"background": 0, **{name: lid for lid, name in LABELS.items()}}
    (folder / "dataset.json").write_text(json.dumps({
        "name": DATASET_NAME, "channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1,
        "file_ending": ".nii.gz"}, indent=2))
    counts = np.bincount(label.ravel(), minlength=max(LABEL_OF_TISSUE.values()) + 1)
    return {"image": str(image_path), "label": str(label_path), "size_xyz": list(size), "spacing_mm": list(spacing),
            "orientation": "RAS", "pixel_type": "int16", "voxels": int(np.prod(size)),
            "hu_range": [int(volume.min()), int(volume.max())],
            "label_voxels": {str(k): int(counts[k]) for k in LABELS},
            "image_file_mb": round(image_path.stat().st_size / 2**20, 1)}


# ------------------------------------------------------------------------------------------------------------ children

def limit_threads(threads: int) -> list[int]:
    """Pin this process to ``threads`` cores; returns them."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def child_duplus(args: argparse.Namespace) -> dict:
    cores = limit_threads(args.threads)
    import numpy as np
    import SimpleITK as sitk

    from duplus.data import preprocess
    from duplus.data.layouts import Case
    from duplus.data.registry import DatasetSpec

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    spec = DatasetSpec(name="bench_ct", modality="CT", sequence=None, region="abdomen", labels=dict(LABELS),
                       kind="msd")
    options = preprocess.settings({"preprocess": {"spacing": [args.target] * 3}})
    case = Case(CASE, Path(args.image), Path(args.label), "bench")
    rss_before = rss_mb()
    stages: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    # process_case looks these up as module globals, so wrapping them times its stages without changing them.
    preprocess.read_case = timed("read", preprocess.read_case)
    preprocess.transform_case = timed("transform", preprocess.transform_case)
    seconds, per_stage = [], []
    for repeat in range(args.repeats):
        out = Path(args.out) / f"run{repeat}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        stages.clear()
        start = time.perf_counter()
        row = preprocess.process_case(case, spec, options, 0, str(out), str(out))
        seconds.append(time.perf_counter() - start)
        per_stage.append({**stages, "write": seconds[-1] - sum(stages.values())})
        log(f"duplus run {repeat}: {seconds[-1]:.2f} s {per_stage[-1]}")
    image = np.load(Path(args.out) / "run0" / CASE / "image.npy", mmap_mode="r")
    meta = json.loads((Path(args.out) / "run0" / CASE / "meta.json").read_text())
    return {"function": "duplus.data.preprocess.process_case", "seconds": seconds, "stages_s": per_stage,
            "output_shape_zyx": list(image.shape), "output_dtype": str(image.dtype), "shape_row": row["shape"],
            "resampled_size_xyz": meta["resampled"]["size"], "crop_box_zyx": meta["crop_box"],
            "interpolation": meta["interpolation"], "normalization": meta["normalization"],
            "cores": cores, "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
            "rss_after_imports_mb": round(rss_before, 1),
            "versions": versions(["duplus", "numpy", "scipy", "SimpleITK", "nibabel"])}


def nnunet_env(root: Path) -> dict[str, str]:
    return {"nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
            "nnUNet_results": str(root / "nnUNet_results")}


def child_nnunet_plan(args: argparse.Namespace) -> dict:
    """Fingerprint and plan the one-case dataset with nnU-Net's own API; 3d_fullres gets the 1.5 mm target."""
    limit_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
        from nnunetv2.paths import nnUNet_preprocessed

        extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, clean=True,
                             verbose=False, show_progress_bar=False)
        plans_name = plan_experiments([DATASET_ID], overwrite_target_spacing=[args.target] * 3)
    plans_file = Path(nnUNet_preprocessed) / DATASET_NAME / f"{plans_name}.json"
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    if [float(s) for s in config["spacing"]] != [args.target] * 3:
        raise RuntimeError(f"{plans_file}: 3d_fullres spacing is {config['spacing']}, expected {[args.target] * 3}")
    return {"plans_file": str(plans_file), "plans_name": plans_name}


def child_nnunet(args: argparse.Namespace) -> dict:
    cores = limit_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):
        import torch
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        torch.set_num_threads(args.threads)
        plans_manager = PlansManager(args.plans)
        configuration = plans_manager.get_configuration("3d_fullres")
        dataset_json = json.loads((Path(args.plans).parent / "dataset.json").read_text())
        rss_before = rss_mb()
        seconds, inner = [], []
        for repeat in range(args.repeats):
            out = Path(args.out) / f"run{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            preprocessor = DefaultPreprocessor(verbose=False)
            run_case = preprocessor.run_case
            shapes: dict = {}

            def timed_run_case(*a, _run_case=run_case, _shapes=shapes, **k):
                start = time.perf_counter()
                data, seg, properties = _run_case(*a, **k)
                inner.append(time.perf_counter() - start)
                _shapes.update(data=list(data.shape), dtype=str(data.dtype))
                return data, seg, properties

            # run_case_save calls run_case then writes the blosc2 store: time both without touching nnU-Net's code.
            preprocessor.run_case = timed_run_case
            start = time.perf_counter()
            preprocessor.run_case_save(str(out / CASE), [args.image], args.label, plans_manager, configuration,
                                       dataset_json)
            seconds.append(time.perf_counter() - start)
            log(f"nnunet run {repeat}: {seconds[-1]:.2f} s (run_case {inner[-1]:.2f} s)")
    cfg = configuration.configuration
    return {"function": "nnunetv2 DefaultPreprocessor.run_case_save", "seconds": seconds, "run_case_s": inner,
            "output_shape_czyx": shapes["data"], "output_dtype": shapes["dtype"],
            "plans": {"spacing": cfg["spacing"], "transpose_forward": plans_manager.transpose_forward,
                      "normalization_schemes": cfg["normalization_schemes"],
                      "resampling_fn_data": cfg["resampling_fn_data"],
                      "resampling_fn_data_kwargs": cfg["resampling_fn_data_kwargs"],
                      "resampling_fn_seg_kwargs": cfg["resampling_fn_seg_kwargs"],
                      "image_reader_writer": plans_manager.plans["image_reader_writer"]},
            "cores": cores, "torch_threads": torch.get_num_threads(), "rss_after_imports_mb": round(rss_before, 1),
            "versions": versions(["nnunetv2", "torch", "numpy", "scipy", "scikit-image", "SimpleITK", "blosc2",
                                  "acvl-utils", "batchgenerators"])}


def child_phantom(args: argparse.Namespace) -> dict:
    return make_phantom(Path(args.out), tuple(args.size), tuple(args.spacing), args.seed)


CHILDREN = {"phantom": child_phantom, "duplus": child_duplus, "nnunet-plan": child_nnunet_plan, "nnunet": child_nnunet}


# -------------------------------------------------------------------------------------------------------------- parent

def run_child(python: str, role: str, args: argparse.Namespace, extra: list[str], env: dict[str, str]) -> dict:
    """Run this file as ``role`` under ``python``; returns its result with its own peak RSS (from wait4)."""
    result_file = Path(args.workdir) / f"{role}.result.json"
    result_file.unlink(missing_ok=True)
    command = [python, os.path.abspath(__file__), "--child", role, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--target", str(args.target), "--result", str(result_file), *extra]
    child_env = {**os.environ, **env, **{var: str(args.threads) for var in THREAD_VARS},
                 "PYTHONUNBUFFERED": "1", "DUPLUS_NO_PROGRESS": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=sys.stderr, env=child_env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"child '{role}' ({python}) failed with exit code {process.returncode}")
    result = json.loads(result_file.read_text())
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024.0, 1)
    result["child_wall_s"] = round(wall, 2)
    return result


def python_has_nnunet(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import nnunetv2.preprocessing.preprocessors.default_preprocessor"],
                           capture_output=True, env={**os.environ, **nnunet_env(Path(tempfile.gettempdir()))})
    return probe.returncode == 0


def summarize(result: dict, voxels: int) -> dict:
    best = min(result["seconds"])
    return {"seconds_per_case": round(best, 3), "seconds_all": [round(s, 3) for s in result["seconds"]],
            "voxels_per_s": round(voxels / best), **{k: v for k, v in result.items() if k != "seconds"}}


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def main_parent(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="duplus-bench-preprocess-"))
    args.workdir = str(workdir)
    root = workdir / "nnunet"
    raw = root / "nnUNet_raw" / DATASET_NAME
    nnunet_python = args.nnunet_python
    if nnunet_python is None and not args.no_nnunet and python_has_nnunet(sys.executable):
        nnunet_python = sys.executable
    try:
        log(f"phantom {args.size} at {args.spacing} mm into {raw}")
        start = time.perf_counter()
        phantom_args = ["--out", str(raw), "--size", *map(str, args.size), "--spacing", *map(str, args.spacing),
                        "--seed", str(args.seed)]
        case = run_child(sys.executable, "phantom", args, phantom_args, {})
        case.pop("peak_rss_mb"), case.pop("child_wall_s")
        log(f"phantom written in {time.perf_counter() - start:.1f} s")
        voxels = case["voxels"]
        files = ["--image", case["image"], "--label", case["label"]]
        duplus = summarize(run_child(sys.executable, "duplus", args, [*files, "--out", str(workdir / "duplus")], {}),
                           voxels)
        report = {"benchmark": "preprocess", "case": {**{k: v for k, v in case.items() if k not in ("image", "label")},
                                                      "target_spacing_mm": [args.target] * 3, "labels": LABELS},
                  "threads": args.threads, "repeats": args.repeats, "duplus": duplus}
        if nnunet_python and not args.no_nnunet:
            if nnunet_python != sys.executable and not python_has_nnunet(nnunet_python):
                raise RuntimeError(f"--nnunet-python {nnunet_python}: nnunetv2 does not import there")
            env = nnunet_env(root)
            for folder in env.values():
                Path(folder).mkdir(parents=True, exist_ok=True)
            log("nnU-Net: fingerprint and plan (not timed)")
            plan = run_child(nnunet_python, "nnunet-plan", args, [], env)
            nnunet = summarize(run_child(nnunet_python, "nnunet", args,
                                         [*files, "--plans", plan["plans_file"], "--out", str(workdir / "nnunet_out")],
                                         env), voxels)
            nnunet["python"] = nnunet_python
            report["nnunet"] = nnunet
            ratio = duplus["seconds_per_case"] / nnunet["seconds_per_case"]
            report["ratio_duplus_over_nnunet"] = round(ratio, 3)
            report["ratio_duplus_over_nnunet_run_case"] = round(duplus["seconds_per_case"] / min(nnunet["run_case_s"]),
                                                                3)
            report["target_duplus_not_slower"] = bool(ratio <= 1.0)
        else:
            report["nnunet"] = None
            report["nnunet_skipped"] = ("--no-nnunet given" if args.no_nnunet
                                        else "nnunetv2 not importable here and no --nnunet-python given")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["notes"] = ("seconds_per_case: best of `repeats` runs of read NIfTI -> preprocessed store written; "
                       "voxels_per_s: input voxels / seconds_per_case; peak_rss_mb: the child process's high-water "
                       "mark (interpreter and imports included; rss_after_imports_mb is that part); ratio < 1 means "
                       "duplus is faster; ratio_duplus_over_nnunet_run_case compares with nnU-Net's run_case alone "
                       "(without its blosc2 write).")
    report["parent_peak_rss_mb"] = round(rss_mb(), 1)  # every child's peak starts at least here
    report["machine"] = {"cpu_count": os.cpu_count(), "cores_used": duplus["cores"], "cpu_model": cpu_model(),
                         "platform": platform.platform(), "python": platform.python_version(),
                         "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                         "packages": {"duplus": duplus["versions"],
                                      "nnunet": (report["nnunet"] or {}).get("versions")},
                         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 200], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], metavar=("X", "Y", "Z"))
    parser.add_argument("--target", type=float, default=1.5, help="isotropic target spacing (mm)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores each variant is pinned to, and its thread limit")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant in its child (best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nnunet-python", help="interpreter with nnunetv2 (default: this one, if it has it)")
    parser.add_argument("--no-nnunet", action="store_true", help="time duplus only")
    parser.add_argument("--workdir", help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--plans", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        result = CHILDREN[args.child](args)
        Path(args.result).write_text(json.dumps(result))
        return
    if args.nnunet_python:
        args.nnunet_python = os.path.abspath(args.nnunet_python) if os.sep in args.nnunet_python \
            else shutil.which(args.nnunet_python) or args.nnunet_python
    report = main_parent(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
