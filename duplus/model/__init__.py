"""The DuPLUS network (modality stems, FiLM residual U-Net, text-driven dynamic head) and its files.

Import from here: ``ModelConfig``, ``DuPLUS``, ``MODALITIES``, ``save_model``, ``load_model``, ...
"""

from duplus.model.backbone import is_channels_last, use_channels_last
from duplus.model.config import MODALITIES, PRESETS, ModelConfig
from duplus.model.duplus import LORA_GROUPS, DuPLUS, count_parameters, lora_target_names, modalities_of, modality_index
from duplus.model.flops import count_macs, efficiency
from duplus.model.model_files import load_model, read_sidecar, save_model, sidecar_path, with_trained_window
from duplus.model.task_specific import TaskSpecificNet

__all__ = [
    "MODALITIES",
    "PRESETS",
    "LORA_GROUPS",
    "ModelConfig",
    "DuPLUS",
    "TaskSpecificNet",
    "count_parameters",
    "count_macs",
    "efficiency",
    "is_channels_last",
    "lora_target_names",
    "modality_index",
    "modalities_of",
    "save_model",
    "load_model",
    "read_sidecar",
    "sidecar_path",
    "use_channels_last",
    "with_trained_window",
]
