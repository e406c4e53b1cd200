"""The DuPLUS network: context prompt (T1) steers the backbone by FiLM, target prompts (T2) steer the head.

One backbone pass serves every requested class; each class costs only its tiny dynamic head.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers import get_act_layer
from torch import nn

from duplus.errors import ConfigError, ModelError
from duplus.model.backbone import Decoder, Encoder, ModalityStems
from duplus.model.config import MODALITIES, ModelConfig
from duplus.model.film import build_film_bank
from duplus.model.head import Controller, DynamicHead

# Spellings met in dataset.json files and manifests.
_MODALITY_ALIASES = {"MR": "MRI", "MRT": "MRI", "PT": "PET", "PET/CT": "PET"}

LORA_GROUPS = ("stems", "encoder", "decoder", "film", "controller")


def modality_index(name: str, modalities: tuple[str, ...] = MODALITIES) -> int:
    """Index of a modality name (case-insensitive; MR -> MRI, PT -> PET) in ``modalities``."""
    key = str(name).strip().upper()
    key = _MODALITY_ALIASES.get(key, key)
    upper = [m.upper() for m in modalities]
    if key not in upper:
        raise ConfigError(f"unknown modality {name!r}; the model has stems for {list(modalities)}")
    return upper.index(key)


def modalities_of(model: nn.Module) -> tuple[str, ...]:
    """The modality names a network has stems for, in index order (peft, DDP, compiled wrappers too).

    Indices passed to a network must come from these, not from the default ``MODALITIES``: a
    model built with ``model.overrides.modalities`` orders (or limits) its stems differently. A
    network without per-modality stems takes the default indices.
    """
    for module in model.modules():
        if isinstance(module, ModalityStems):
            return tuple(module.names)
    return MODALITIES


class DuPLUS(nn.Module):
    """Dual-prompt universal segmentation network.

    Submodules (names used by LoRA target selection): ``stems``, ``encoder``, ``decoder``,
    ``film`` (all FiLM generators), ``controller``, ``text_proj`` (``context``/``target``), ``head``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stems = ModalityStems(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.text_proj = nn.ModuleDict(
            {"context": nn.Linear(cfg.text_dim, cfg.embed_dim), "target": nn.Linear(cfg.text_dim, cfg.embed_dim)}
        )
        # Sentence embeddings of prompts that differ in one word are nearly parallel (MiniLM:
        # cosine 0.97 for left vs right kidney) and small per dimension, so raw they barely move
        # the controller. They are centred on the mean of the training prompts (buffers, saved
        # with the weights) and the projections are layer-normalised: the differences that tell
        # classes apart reach the head at full scale from the first step.
        self.register_buffer("context_center", torch.zeros(cfg.text_dim))
        self.register_buffer("target_center", torch.zeros(cfg.text_dim))
        self.text_norm = nn.ModuleDict({"context": nn.LayerNorm(cfg.embed_dim), "target": nn.LayerNorm(cfg.embed_dim)})
        self.text_act = get_act_layer(cfg.act)
        slots = {**self.encoder.film_slots(), **self.decoder.film_slots()}
        self.film = build_film_bank(slots, cfg.embed_dim, cfg.film_hidden, cfg.act)
        self.controller = Controller(cfg)
        self.head = DynamicHead(cfg.head_channels)

    # -- conditioning -------------------------------------------------------------------------
    def film_params(self, context: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(gamma, beta) of every FiLM slot for context embeddings [B, T]."""
        centred = context - self.context_center.to(context.dtype)
        embed = self.text_act(self.text_norm["context"](self.text_proj["context"](centred)))
        return {name: generator(embed) for name, generator in self.film.items()}

    def project_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Class embeddings [B, K, T] -> [B, K, E]."""
        centred = targets - self.target_center.to(targets.dtype)
        return self.text_act(self.text_norm["target"](self.text_proj["target"](centred)))

    def set_text_centers(self, context_mean: torch.Tensor, target_mean: torch.Tensor) -> None:
        """Centre prompt embeddings on these means (of the training prompts; set before training)."""
        with torch.no_grad():
            self.context_center.copy_(torch.as_tensor(context_mean, dtype=torch.float32).reshape(-1))
            self.target_center.copy_(torch.as_tensor(target_mean, dtype=torch.float32).reshape(-1))

    # -- passes -------------------------------------------------------------------------------
    def features(
        self, image: torch.Tensor, modality: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone pass: (decoder features [B, head_channels, Z, Y, X], bottleneck F_dense)."""
        self._check_inputs(image, modality, context)
        films = self.film_params(context)
        skips = self.encoder(self.stems(image, modality), films)
        bottleneck = skips[-1]  # before the decoder, which may empty the list (Decoder.forward)
        return self.decoder(skips, films), bottleneck

    def encode(self, image: torch.Tensor, modality: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Bottleneck F_dense [B, C, z, y, x] (encoder only; used by prognosis)."""
        self._check_inputs(image, modality, context)
        films = self.film_params(context)
        return self.encoder(self.stems(image, modality), films)[-1]

    def forward(
        self, image: torch.Tensor, modality: torch.Tensor, context: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, K, Z, Y, X], one channel per target prompt; sigmoid, not softmax (multi-label)."""
        targets = self._batch_targets(targets, image.shape[0])
        features, bottleneck = self.features(image, modality, context)
        params = self.controller(bottleneck, self.project_targets(targets))
        return self.head(features, params)

    # -- checks -------------------------------------------------------------------------------
    def _check_inputs(self, image: torch.Tensor, modality: torch.Tensor, context: torch.Tensor) -> None:
        if image.dim() != 5 or image.shape[1] != 1:
            raise ModelError(f"image must be [B, 1, Z, Y, X], got {tuple(image.shape)}")
        if context.dim() != 2 or context.shape != (image.shape[0], self.cfg.text_dim):
            raise ModelError(
                f"context must be [B={image.shape[0]}, T={self.cfg.text_dim}], got {tuple(context.shape)}"
                " (is the prompt cache from the encoder the model was trained with?)"
            )
        factor = self.cfg.downsample_factor
        # A list, not a generator: torch.compile cannot trace a generator argument and would
        # split the network's graph here.
        if math.prod([-(-int(n) // factor) for n in image.shape[2:]]) < 2:
            # Instance norm needs more than one bottleneck voxel to compute its statistics.
            raise ModelError(
                f"input {tuple(image.shape[2:])} is too small for this model: the bottleneck would be a single "
                f"voxel; use windows of at least {2 * factor} voxels along one axis (pretrain.patch_size)"
            )
        if modality.dtype not in (torch.int64, torch.int32):
            raise ModelError(f"modality must be an integer index tensor, got dtype {modality.dtype}")

    def _batch_targets(self, targets: torch.Tensor, batch: int) -> torch.Tensor:
        if targets.dim() == 2:
            targets = targets.unsqueeze(0).expand(batch, -1, -1)
        if targets.dim() != 3 or targets.shape[0] != batch or targets.shape[2] != self.cfg.text_dim:
            raise ModelError(f"targets must be [K, {self.cfg.text_dim}] or [B={batch}, K, {self.cfg.text_dim}], "
                             f"got {tuple(targets.shape)}")
        if targets.shape[1] == 0:
            raise ModelError("targets is empty: give at least one class prompt")
        return targets


def _find_duplus(model: nn.Module) -> tuple[str, DuPLUS]:
    for name, module in model.named_modules():
        if isinstance(module, DuPLUS):
            return name, module
    raise ModelError(f"{type(model).__name__} contains no DuPLUS network")


def lora_target_names(
    model: nn.Module,
    groups: list[str] | tuple[str, ...],
    text_projection: bool = False,
    modalities: list[str] | tuple[str, ...] | None = None,
) -> list[str]:
    """Full names of the Conv3d/Linear modules in ``groups`` (+ ``text_proj``), for peft ``target_modules``.

    Names are relative to the DuPLUS network (what ``peft.get_peft_model(model, ...)`` matches).
    ``modalities``: the modalities the adapted center scans; of the ``stems`` group only their
    stems are adapted (the others never see the center's images, so their LoRA would stay idle).
    """
    unknown = sorted(set(groups) - set(LORA_GROUPS))
    if unknown:
        raise ConfigError(f"lora.targets has unknown part(s) {unknown}; choose from {list(LORA_GROUPS)}")
    _, net = _find_duplus(model)
    wanted = set(groups) | ({"text_proj"} if text_projection else set())
    stems = None
    if modalities is not None:
        stems = {net.cfg.modalities[modality_index(m, tuple(net.cfg.modalities))] for m in modalities}
    names = []
    for name, module in net.named_modules():
        part, _, rest = name.partition(".")
        if not isinstance(module, (nn.Conv3d, nn.Linear)) or part not in wanted:
            continue
        if part == "stems" and stems is not None and rest.split(".", 1)[0] not in stems:
            continue
        names.append(name)
    return names


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
