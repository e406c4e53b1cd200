"""The benchmark scripts run and report what they claim (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_reports_each_variant_and_batch_with_a_summary(capsys):
    bench = _script("train_step")
    result = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--batch", "1", "2",
                         "--variants", "eager-fp32", "eager-fp32-cl", "--device", "cpu"])
    assert [(run["variant"], run["batch"]) for run in result["runs"]] == [
        ("eager-fp32", 1), ("eager-fp32-cl", 1), ("eager-fp32", 2), ("eager-fp32-cl", 2)]
    assert all(run["samples_per_s"] > 0 and run["achieved_tflops"] > 0 for run in result["runs"])
    assert result["summary"]["speedup_vs_eager_fp32"] >= 1.0  # the fastest run is at least the baseline
    assert "share_of_bf16_peak" not in result["summary"]  # no peak for a CPU
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))


def test_train_step_profile_says_where_a_step_spends_its_time():
    bench = _script("train_step")
    result = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--batch", "1",
                         "--variants", "eager-fp32", "eager-fp32-cl", "--profile", "eager-fp32-cl", "--device", "cpu"])
    plain, profiled = result["runs"]
    assert "profile" not in plain
    profile = profiled["profile"]
    assert profile["ms_per_step"] > 0
    assert sum(c["share"] for c in profile["by_category"].values()) == pytest.approx(1.0)
    assert "convolution" in profile["by_category"]  # a 3-D U-Net step without convolutions is not this step
    assert profile["top"] == sorted(profile["top"], key=lambda row: -row["ms_per_step"])
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.main(["--preset", "tiny", "--variants", "eager-fp32", "--profile", "eager-fp64"])


def test_kernel_names_fall_into_the_categories_a_gpu_profile_needs():
    bench = _script("train_step")
    names = {
        "void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>": "layout transpose",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_ndhwc_kernel": "convolution",
        "void cudnn::bn_fw_tr_1C11_kernel_NCHW<__nv_bfloat16>": "normalisation",
        "triton_per_fused__native_batch_norm_legit_elu_mul_0": "fused (compiled)",
        "void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>": "dtype cast",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "void cudnn::engines_precompiled::nhwcToNchwKernel<float>": "layout transpose",
        "void at::native::reduce_kernel<512, 1, LpNormFunctor<float>>": "gradient clipping",
        "void multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_nn": "matmul",
        "void at::native::vectorized_elementwise_kernel<4, EluBackwardFunctor>": "elementwise",
        "void at::native::(anonymous namespace)::upsample_trilinear3d_backward_out_frame<c10::BFloat16, float>":
            "upsampling",
        "triton_poi_fused_upsample_trilinear3d_cat_3": "fused (compiled)",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>,"
        " unsigned int, 4, 64, 64>": "concatenation",
        "Memset (Device)": "other",
    }
    assert {name: bench.kernel_category(name) for name in names} == names


def test_train_step_summary_against_a_known_gpu_peak():
    bench = _script("train_step")
    runs = [{"variant": "eager-fp32", "batch": 2, "samples_per_s": 7.0, "achieved_tflops": 44.0},
            {"variant": "compiled-bf16-cl", "batch": 8, "samples_per_s": 35.0, "achieved_tflops": 220.0},
            {"variant": "compiled-fp32", "batch": 8, "error": "OutOfMemoryError: ..."}]
    summary = bench.summarize(runs, "NVIDIA H100 80GB HBM3")
    assert summary["fastest"] == "compiled-bf16-cl at batch 8"
    assert summary["speedup_vs_eager_fp32"] == pytest.approx(5.0)
    assert summary["share_of_bf16_peak"] == pytest.approx(220.0 / 989.4)
    assert bench.bf16_peak("Intel Xeon") is None
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.main(["--preset", "tiny", "--variants", "eager-fp64"])


def test_loader_bench_compares_with_a_measured_step_rate(tmp_path):
    bench = _script("loader")
    measured = tmp_path / "train_step.json"
    measured.write_text(json.dumps({"batch": 2, "machine": {"device": "GPU X"}, "runs": [
        {"variant": "eager-fp32", "samples_per_s": 4.0}, {"variant": "compiled-bf16", "samples_per_s": 10.0}]}))
    result = bench.main(["--preset", "tiny", "--batches", "3", "--warmup-batches", "1", "--no-train",
                         "--compare", str(measured), "--device", "cpu"])
    assert result["compared_with"]["variant"] == "compiled-bf16"
    assert result["loader_to_compared_ratio"] == pytest.approx(result["loader_patches_per_s"] / 10.0)
    assert result["workers_for_2x_compared"] >= 1
    assert result["sample_seconds_one_thread"] > 0 and "train_steps_per_s" not in result


def test_gpu_suite_chain_runs_at_the_tiny_size(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PRESET": "tiny", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    written = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.json"))
    assert written == ["inference", "loader", "roofline", "train_step"], done.stderr
    loader = json.loads(next(tmp_path.glob("loader-*.json")).read_text())
    assert loader["compared_with"]["file"].endswith(".json")  # fed by the train_step JSON just written
    train_step = json.loads(next(tmp_path.glob("train_step-*.json")).read_text())
    assert [("profile" in run) for run in train_step["runs"]] == [False, True]
    roofline = json.loads(next(tmp_path.glob("roofline-*.json")).read_text())
    assert [run["variant"] for run in roofline["measured"]] == ["eager-fp32", "eager-fp32-cl"]
    assert not list(tmp_path.glob("*.log")) and not list(tmp_path.glob("*.tmp"))


def test_loader_compares_with_the_fastest_step_over_several_results(tmp_path):
    bench = _script("loader")
    small, large = tmp_path / "b2.json", tmp_path / "b8.json"
    small.write_text(json.dumps({"runs": [{"variant": "compiled-bf16", "batch": 2, "samples_per_s": 15.0}]}))
    large.write_text(json.dumps({"runs": [{"variant": "compiled-bf16-cl", "batch": 8, "samples_per_s": 24.0},
                                          {"variant": "eager-fp32", "batch": 8, "error": "OutOfMemoryError"}]}))
    best = bench.fastest_step([small, tmp_path / "missing.json", large])
    assert (best["variant"], best["batch"], best["file"]) == ("compiled-bf16-cl", 8, str(large))
    assert bench.fastest_step([tmp_path / "missing.json"]) is None  # the loader's own numbers still count


def test_roofline_counts_the_step_the_benchmarks_time_and_orders_its_bounds(tmp_path, capsys):
    bench = _script("roofline")
    measured = tmp_path / "train_step.json"
    measured.write_text(json.dumps({"runs": [
        {"variant": "compiled-bf16", "batch": 2, "seconds_per_step": 0.5},
        {"variant": "compiled-bf16", "batch": 8, "seconds_per_step": 1.5},
        {"variant": "eager-fp32", "batch": 2, "error": "OutOfMemoryError"}]}))
    result = bench.main(["--preset", "tiny", "--patch", "32", "32", "32", "--batch", "2", "--gpu", "h200",
                         "--compare", str(measured)])
    # The traced FLOPs are torch's own count of the real step; the benchmarks' 6 x forward MACs
    # overstates it only by the first convolution's unneeded input gradient.
    assert 0.97 < result["flops_per_step"] / result["flops_counted_by_benchmarks"] <= 1.0
    limits = result["bounds_ms"]
    assert 0 < limits["matmul_at_peak_ms"] < limits["fused_ms"] < limits["unfused_ms"]
    assert all(0 < share < 1 for share in result["max_share_of_peak"].values())
    assert result["optimizer_bytes"] == result["params"] * bench.OPTIMIZER_BYTES_PER_PARAM
    assert result["by_resolution"][0]["side"] == 32.0  # the finest level comes first
    assert {op["op"] for op in result["top_ops"]} >= {"convolution", "convolution_backward"}
    (row,) = result["measured"]  # batch 2 only, the failed run left out
    assert row["measured_ms"] == pytest.approx(500.0)
    assert row["x_fused"] == pytest.approx(500.0 / limits["fused_ms"])
    assert json.loads(capsys.readouterr().out)["gpu"] == {"name": "h200", "bf16_peak_tflops": 989.4,
                                                          "memory_tb_per_s": 4.8}


def test_roofline_of_an_inference_window_is_the_forward_count_exactly():
    bench = _script("roofline")
    result = bench.main(["--preset", "tiny", "--patch", "32", "32", "32", "--batch", "1", "--mode", "inference",
                         "--compare", "/nonexistent/train_step.json"])
    assert result["flops_per_step"] == result["flops_counted_by_benchmarks"]
    assert result["optimizer_bytes"] == 0 and result["measured"] == []


def test_a_time_limit_keeps_the_runs_already_measured(monkeypatch, capsys):
    """`timeout` sends SIGTERM: the variant in progress stops, the rest are marked, the JSON is printed."""
    bench = _script("train_step")
    real = bench._variant
    calls = []

    def variant(cfg, device, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise bench.TimeLimit()
        return real(cfg, device, name, *args, **kwargs)

    monkeypatch.setattr(bench, "_variant", variant)
    result = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--batch", "1",
                         "--variants", "eager-fp32", "eager-fp32-cl", "eager-bf16"])
    assert [run["variant"] for run in result["runs"]] == ["eager-fp32", "eager-fp32-cl", "eager-bf16"]
    assert "samples_per_s" in result["runs"][0]
    assert result["runs"][1]["error"] == result["runs"][2]["error"] == bench.STOPPED
    assert calls == ["eager-fp32", "eager-fp32-cl"]
    assert json.loads(capsys.readouterr().out)["runs"][0]["variant"] == "eager-fp32"


def test_each_compiled_variant_compiles_afresh_with_static_shapes(monkeypatch):
    """Compiled variants after the first (another batch or layout) must not inherit dynamo's state:
    it would compile them with symbolic sizes or strides, unlike a training run of fixed patches."""
    import torch

    bench = _script("train_step")
    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))

    def compile(model, **kwargs):
        calls.append(("compile", kwargs.get("dynamic", "unset")))
        return model  # eager: the test is about how compilation is asked for, not about inductor

    monkeypatch.setattr(torch, "compile", compile)
    result = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--batch", "1", "2",
                         "--variants", "compiled-fp32", "eager-fp32", "--device", "cpu"])
    assert all("samples_per_s" in run for run in result["runs"])
    assert calls == ["reset", ("compile", False)] * 2


def test_a_time_limit_during_a_profile_keeps_that_variants_timing(monkeypatch, capsys):
    import os
    import signal

    bench = _script("train_step")

    def profile(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` does, while the profiler runs
        raise AssertionError("the SIGTERM handler should have stopped the profile")

    monkeypatch.setattr(bench, "profile_steps", profile)
    before = signal.getsignal(signal.SIGTERM)
    result = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--batch", "1",
                         "--variants", "eager-fp32", "eager-fp32-cl", "--profile", "eager-fp32", "--device", "cpu"])
    timed, stopped = result["runs"]
    assert timed["samples_per_s"] > 0 and timed["achieved_tflops"] > 0
    assert timed["profile"] == {"error": bench.STOPPED}
    assert stopped == {"variant": "eager-fp32-cl", "batch": 1, "error": bench.STOPPED}
    assert result["summary"]["fastest"] == "eager-fp32 at batch 1"
    assert json.loads(capsys.readouterr().out)["runs"][0]["samples_per_s"] == timed["samples_per_s"]
    assert signal.getsignal(signal.SIGTERM) == before  # restored once the output is written


def test_inference_cut_by_a_time_limit_keeps_the_volumes_it_timed(monkeypatch, capsys):
    import os
    import signal

    bench = _script("inference")
    real, counts = bench._volume_run, []

    def volume_run(model, device, volume, cfg, config, k):
        counts.append(k)
        if len(counts) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, device, volume, cfg, config, k)

    monkeypatch.setattr(bench, "_volume_run", volume_run)
    result = bench.main(["--preset", "tiny", "--size", "40", "40", "40", "--prompts", "1", "8", "--device", "cpu"])
    assert [run["prompts"] for run in result["runs"]] == [1]
    assert result["runs"][0]["seconds_per_volume"] > 0
    assert result["class_scaling_ratio"] is None and "[8]" in result["stopped"]
    assert json.loads(capsys.readouterr().out)["runs"] == result["runs"]


def _suite(tmp_path, **env):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(tmp_path / "out")], check=False, env=env,
                          capture_output=True, text=True, timeout=120)


def test_gpu_suite_stops_before_any_part_when_a_module_is_missing(tmp_path):
    """Without monai every part fails within seconds: the suite says so once, and spends nothing."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'monai':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    (tmp_path / "wheels").mkdir()
    done = _suite(tmp_path, PRESET="tiny", PYTHONPATH=str(hide), WHEELS=str(tmp_path / "wheels"))
    assert done.returncode == 3, done.stderr
    assert "missing Python modules: monai" in done.stderr and "fetch_wheels.sh" in done.stderr
    assert "== train_step" not in done.stderr and not list((tmp_path / "out").glob("*.json"))


def test_gpu_suite_at_the_paper_size_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = _suite(tmp_path, PRESET="paper")
    assert done.returncode == 4 and "no CUDA GPU" in done.stderr
    assert not list((tmp_path / "out").glob("*"))


def test_metrics_bench_times_both_definitions_of_each_class(capsys):
    result = _script("metrics").main(["--size", "40", "96", "96", "--repeat", "1"])
    assert [run["class"] for run in result["runs"]] == ["liver", "kidney", "lesion"]
    for run in result["runs"]:
        new, old = run["surface_elements"], run["boundary_voxels"]
        assert new["seconds"] > 0 and old["seconds"] > 0
        assert new["dice"] == pytest.approx(old["dice"])  # same masks, same Dice: only the surface metrics differ
        assert 0 < new["nsd"] <= 1 and new["hd95"] > 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))


def test_cpu_inference_sets_each_part_against_the_convolution_rate(tmp_path, capsys):
    """Roofline, window settings and volumes in one run; nnU-Net, absent here, is skipped with a note."""
    bench = _script("cpu_inference")
    result = bench.main(["--preset", "tiny", "--size", "20", "24", "24", "--patch", "16", "16", "16", "--prompts", "2", "1",
                         "--repeats", "1", "--settings", "batch-2", "bf16", "--threads", "1", "--in-process",
                         "--nnunet-python", str(tmp_path / "missing" / "python")])
    roofline = result["roofline"]
    # Every convolution of the window was traced and timed: they carry (almost) all the network's FLOPs.
    assert roofline["distinct_convolutions"] >= 5 and roofline["gflops"] > 0
    assert 0.9 < roofline["conv_share_of_network_flops"] <= 1.0
    assert abs(sum(shape["share_of_time"] for shape in roofline["shapes"]) - 1.0) < 1e-9
    assert result["window"] == [16, 16, 16]  # the window's size, beside the window part's runs
    batch, bf16 = result["window_settings"]["runs"]
    assert batch["sw_batch_size"] == 2 and batch["seconds_per_window"] > 0 and "share_of_roofline" in batch
    assert ("skipped" in bf16) != bench._bf16_supported()
    assert [run["prompts"] for run in result["duplus"]] == [1, 2]  # fewest first
    assert all(run["peak_rss_mb"] > 0 and run["share_of_roofline"] > 0 for run in result["duplus"])
    assert all("install_nnunet.sh" in run["skipped"] for run in result["nnunet"])
    assert result["summary"]["nnunet_vs_duplus_one_prompt"] == {}
    assert json.loads(capsys.readouterr().out)["summary"] == result["summary"]


def test_cpu_inference_summarises_a_run_of_the_volumes_alone(capsys):
    bench = _script("cpu_inference")
    result = bench.main(["--preset", "tiny", "--size", "20", "24", "24", "--patch", "16", "16", "16", "--prompts", "1",
                         "--threads", "1", "--in-process", "--parts", "duplus"])
    assert result["summary"]["peak_rss_mb_most_prompts"] > 0 and result["summary"]["backbone_share_of_roofline"] is None
    assert json.loads(capsys.readouterr().out)["summary"] == result["summary"]


def test_nnunet_predict_describes_a_network_of_the_asked_widths():
    """The plans dict nnU-Net's own network builder reads (checked without nnU-Net installed)."""
    bench = _script("nnunet_predict")
    args = bench.parse_args(["--size", "40", "48", "48", "--patch", "32", "32", "32", "--features", "8", "16", "32",
                             "--blocks", "2", "--decoder-convs", "4", "--classes", "3"])
    arch = bench.plans(args)["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"] == [8, 16, 32] and arch["n_blocks_per_stage"] == [2, 2, 2]
    assert arch["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]] and arch["n_conv_per_stage_decoder"] == [4, 4]


def test_blend_memory_measures_each_prompt_count_in_its_own_process(capsys):
    bench = _script("blend_memory")
    result = bench.main(["--size", "20", "40", "40", "--window", "16", "16", "16", "--prompts", "1", "3", "--threads", "1"])
    assert [run["prompts"] for run in result["runs"]] == [1, 3]
    for run in result["runs"]:
        assert run["peak_rss_mb"] >= run["before_blending_mb"] > 0 and run["masks_mb"] > 0
    assert json.loads(capsys.readouterr().out)["runs"] == result["runs"]


def test_blend_memory_stands_in_for_the_forwards_activations():
    bench = _script("blend_memory")
    result = bench.main(["--size", "20", "40", "40", "--window", "16", "16", "16", "--prompts", "2", "--threads", "1",
                         "--forward-mb", "300"])
    run = result["runs"][0]
    assert result["forward_mb"] == 300
    # The 300 MB each window's forward fills come on top of what blending holds beside it.
    assert run["peak_rss_mb"] >= run["before_blending_mb"] + 250


def test_blend_time_interleaves_rounds_and_keeps_the_fastest(capsys):
    bench = _script("blend_time")
    result = bench.main(["--size", "20", "40", "40", "--window", "16", "16", "16", "--prompts", "1", "3",
                         "--rounds", "2", "--threads", "1", "--window-seconds", "1.0"])
    runs = result["runs"]["this"]
    assert sorted(runs) == ["1", "3"] and all(len(rs) == 2 for rs in runs.values())
    summary = result["blending_seconds_per_window"]["this"]
    for prompts, rs in runs.items():
        assert all(r["seconds"] >= r["network_seconds"] > 0 and "load_average_before" in r for r in rs)
        assert summary[prompts] == min(r["blending_seconds_per_window"] for r in rs)
    assert summary["ratio_from_blending"] == (1.0 + summary["3"]) / (1.0 + summary["1"])
    assert json.loads(capsys.readouterr().out)["blending_seconds_per_window"] == result["blending_seconds_per_window"]


def test_forward_cpu_runs_each_code_in_its_own_process_and_compares_the_logits(capsys):
    bench = _script("forward_cpu")
    root = str(BENCH.parent)
    result = bench.main(["--window", "32", "32", "32", "--prompts", "2", "--rounds", "1", "--threads", "1",
                         "--code", f"one={root}", f"two={root}", "--layouts", "ncdhw", "ndhwc"])
    assert set(result["best"]) == {"one", "two", "one/ndhwc", "two/ndhwc"}
    # The layout changes float rounding only.
    assert result["logits"]["one/ndhwc"]["max_abs_logit_diff"] <= 1e-4
    for run in result["best"].values():
        assert run["peak_rss_mb"] >= run["rss_before_mb"] > 0 and run["seconds"] > 0 and run["cpu_seconds"] > 0
    # The same code twice: the same logits, so the same masks.
    assert result["logits"]["two"]["max_abs_logit_diff"] == 0.0 and result["logits"]["two"]["masks_equal"]
    assert result["logits"]["two"]["mask_voxels_differing"] == 0
    assert json.loads(capsys.readouterr().out)["logits"] == result["logits"]


def test_head_cpu_times_this_head_beside_an_older_one_and_compares_the_logits(capsys, tmp_path):
    bench = _script("head_cpu")
    before = tmp_path / "head_before.py"
    before.write_text((BENCH.parent / "duplus" / "model" / "head.py").read_text())
    result = bench.main(["--window", "16", "16", "16", "--prompts", "1", "4", "--rounds", "1", "--threads", "1",
                         "--min-run-time", "0.01", "--before", str(before), "--budgets", "1", "1073741824"])
    names = {"before", "this@1", "this@1073741824"}
    assert set(result["best"]) == {"1", "4"} and all(set(runs) == names for runs in result["best"].values())
    assert all(run["seconds"] > 0 and "load_average_before" in run for runs in result["best"].values()
               for run in runs.values())
    # The same code as "before": the logits agree to float rounding and the masks match.
    for compared in result["logits"].values():
        assert set(compared) == names - {"before"}
        assert all(c["max_abs_logit_diff"] <= 1e-5 and c["against"] == "before" for c in compared.values())
    assert set(result["summary"]["speedup_over_before"]) == {"1", "4"}
    assert result["summary"]["this@1"]["4_vs_1_prompts"] > 0
    assert json.loads(capsys.readouterr().out)["summary"] == result["summary"]


def test_blend_time_runs_other_versions_of_the_code_beside_this_one(tmp_path):
    bench = _script("blend_time")
    assert bench.parse_child_argv(["--rounds", "2", "--before", "/a", "--code", "x=/b", "--code=y=/c", "--one", "1"]) == \
        ["--rounds", "2", "--one", "1"]
    older = tmp_path / "older"
    older.mkdir()
    (older / "duplus").symlink_to(Path(bench.__file__).resolve().parents[1] / "duplus")
    result = bench.main(["--size", "20", "40", "40", "--window", "16", "16", "16", "--prompts", "1",
                         "--rounds", "1", "--threads", "1", "--code", f"older={older}"])
    assert list(result["runs"]) == ["older", "this"] and result["code"] == {"older": str(older)}
    assert all("failed" not in r for runs in result["runs"].values() for r in runs["1"])
