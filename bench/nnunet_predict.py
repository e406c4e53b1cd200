"""nnU-Net v2's own predictor on a synthetic volume: seconds and peak RSS, for bench/cpu_inference.py.

Runs under the separate nnU-Net environment (``tools/install_nnunet.sh``), not the project's: it
imports no ``duplus``. The network is nnU-Net's ``ResidualEncoderUNet`` built from a plans dict by
nnU-Net's own ``get_network_from_plans``, at the widths and depth asked (untrained weights: the
time does not depend on them), and ``nnUNetPredictor`` runs it as ``nnUNetv2_predict`` does:
Gaussian sliding window, fp16 whole-volume accumulation, optional mirroring over all three axes,
then softmax and argmax (``convert_logits_to_segmentation``). Resampling back to the original
grid and writing files are left out, as the DuPLUS side times the preprocessed grid only.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"))
    parser.add_argument("--patch", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"))
    parser.add_argument("--features", type=int, nargs="+", required=True, help="widths per resolution")
    parser.add_argument("--blocks", type=int, default=1, help="residual blocks per encoder stage")
    parser.add_argument("--decoder-convs", type=int, default=2, help="convolutions per decoder stage")
    parser.add_argument("--classes", type=int, default=1, help="foreground classes (softmax over these + background)")
    parser.add_argument("--overlap", type=float, default=0.5, help="1 - nnU-Net's tile_step_size")
    parser.add_argument("--mirror", action="store_true", help="test-time mirroring over all three axes (8 passes)")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def plans(args: argparse.Namespace) -> dict:
    """The least of a plans file that builds the network and drives the predictor."""
    stages = len(args.features)
    return {
        "dataset_name": "Dataset999_Bench", "plans_name": "nnUNetResEncUNetPlans",
        "original_median_spacing_after_transp": [1.5, 1.5, 1.5], "original_median_shape_after_transp": list(args.size),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "nnUNetPlannerResEncM", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres": {
            "data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(args.patch), "median_image_size_in_voxels": list(args.size), "spacing": [1.5, 1.5, 1.5],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
            "batch_dice": False,
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                "arch_kwargs": {
                    "n_stages": stages, "features_per_stage": list(args.features),
                    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * stages,
                    "strides": [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1), "n_blocks_per_stage": [args.blocks] * stages,
                    "n_conv_per_stage_decoder": [args.decoder_convs] * (stages - 1), "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
        }},
    }


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM): ``getrusage``'s keeps the parent's RSS at fork across exec."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def forward_macs(network, patch: list[int]) -> int:
    """Multiply-adds of one window, counted by torch on the meta device (no compute)."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(network).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.empty((1, 1, *patch), device="meta"))
    return counter.get_total_flops() // 2


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints its notes to stdout; the JSON goes there
        result = run(args)
    print(json.dumps(result, indent=2), flush=True)
    return result


def run(args: argparse.Namespace) -> dict:
    import nnunetv2
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans(args))
    configuration = manager.get_configuration("3d_fullres")
    dataset = {"labels": {"background": 0, **{f"class_{k}": k + 1 for k in range(args.classes)}},
               "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 0}
    labels = manager.get_label_manager(dataset)
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, 1,
                                     labels.num_segmentation_heads, allow_init=True, deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=1 - args.overlap, use_gaussian=True, use_mirroring=args.mirror,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(network, manager, configuration, [network.state_dict()], dataset,
                                    "nnUNetTrainer", (0, 1, 2))
    slicers = predictor._internal_get_sliding_window_slicers(tuple(max(s, p) for s, p in zip(args.size, args.patch)))
    volume = torch.randn((1, *args.size))
    # One untimed window first, as the DuPLUS side does: allocator and kernel set-up are not charged.
    with torch.inference_mode():
        network.eval()(torch.randn((1, 1, *args.patch)))
    start = time.perf_counter()
    logits = predictor.predict_logits_from_preprocessed_data(volume)
    segmentation = labels.convert_logits_to_segmentation(logits)
    seconds = time.perf_counter() - start
    return {
        "script": "bench/nnunet_predict.py",
        "network": "nnU-Net ResidualEncoderUNet (untrained)",
        "features": list(args.features), "blocks_per_stage": args.blocks, "decoder_convs": args.decoder_convs,
        "params": sum(p.numel() for p in network.parameters()),
        "macs_per_window": forward_macs(network, args.patch),
        "volume": list(args.size), "window": list(args.patch), "overlap": args.overlap,
        "windows_per_volume": len(slicers), "mirroring": args.mirror,
        "forward_passes_per_window": 8 if args.mirror else 1,
        "classes": args.classes, "segmentation_shape": list(segmentation.shape),
        "seconds_per_volume": seconds, "peak_rss_mb": peak_rss_mb(),
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                    "nnunetv2": getattr(nnunetv2, "__version__", None) or _version("nnunetv2"),
                    "python": platform.python_version()},
    }


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
