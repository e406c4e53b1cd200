"""3D residual U-Net of DuPLUS: one input stem per modality, FiLM-modulated pre-activation blocks.

Encoder stages downsample with stride-2 convs; the decoder upsamples trilinearly and concatenates skips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers import get_act_layer, get_norm_layer
from torch import nn

from duplus.errors import ModelError
from duplus.model.config import ModelConfig
from duplus.model.film import apply_film

FilmParams = dict[str, tuple[torch.Tensor, torch.Tensor]]


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for an NDHWC tensor (that is not also NCDHW), else the default layout."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def use_channels_last(model: nn.Module) -> nn.Module:
    """Switch a DuPLUS (or task-specific) network to channels-last (NDHWC), in place; returns it.

    cuDNN's tensor-core kernels for bf16/fp16 3-D convolutions then need no layout transposes.
    Outputs equal the default layout's up to float rounding; only speed differs, which depends on
    the GPU and on ``torch.compile`` (``bench/train_step.py`` measures it), so it is a switch.
    """
    model.to(memory_format=torch.channels_last_3d)
    for module in model.modules():
        if isinstance(module, ModalityStems):
            module.channels_last = True
    return model


class InstanceNorm3dKeepLayout(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` whose output keeps a channels-last (NDHWC) input's layout.

    PyTorch's instance-norm kernel returns NCDHW whatever it is given, so in a channels-last
    network every block would pay a transpose into the norm and one back for the next conv. For
    a channels-last input the statistics are taken here with layout-preserving ops (float32, as
    the native kernel accumulates); any other input takes the native kernel. Same parameters.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 5 or self.track_running_stats or x.is_contiguous()
                or not x.is_contiguous(memory_format=torch.channels_last_3d)):
            return super().forward(x)
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(2, 3, 4), keepdim=True, correction=0)
        # Normalisation and affine folded into one per-(sample, channel) scale and shift, so the
        # map is read and written once (as in eager mode, where nothing fuses the steps).
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            weight = self.weight.float().view(1, -1, 1, 1, 1)
            scale = scale * weight
            shift = shift * weight + self.bias.float().view(1, -1, 1, 1, 1)
        return torch.addcmul(shift, xf, scale).to(x.dtype)


def make_norm(name: str, channels: int) -> nn.Module:
    """Norm layer by name; instance and batch norms get learnable affine parameters."""
    if name == "instance":
        return InstanceNorm3dKeepLayout(channels, affine=True)
    if name == "batch":
        return get_norm_layer((name, {"affine": True}), spatial_dims=3, channels=channels)
    if name == "group":
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        return get_norm_layer(("group", {"num_groups": groups}), spatial_dims=3, channels=channels)
    return get_norm_layer(name, spatial_dims=3, channels=channels)


def conv3d(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> Convolution:
    """A plain Conv3d (``.conv``) with 'same' padding; norm and activation live in the blocks."""
    return Convolution(3, in_ch, out_ch, strides=stride, kernel_size=kernel, conv_only=True)


class PreActResBlock(nn.Module):
    """norm-act-conv-norm-[FiLM]-act-conv plus shortcut (1x1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, cfg: ModelConfig, film_key: str | None) -> None:
        super().__init__()
        self.film_key = film_key
        self.norm1 = make_norm(cfg.norm, in_ch)
        self.act1 = get_act_layer(cfg.act)
        self.conv1 = conv3d(in_ch, out_ch)
        self.norm2 = make_norm(cfg.norm, out_ch)
        self.act2 = get_act_layer(cfg.act)
        self.drop = nn.Dropout3d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.conv2 = conv3d(out_ch, out_ch)
        self.shortcut = conv3d(in_ch, out_ch, kernel=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, films: FilmParams) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.norm2(h)
        if self.film_key is not None:
            # After the norm, as in FiLM: the context rescales normalised channel statistics.
            h = apply_film(h, films[self.film_key])
        h = self.conv2(self.drop(self.act2(h)))
        skip = self.shortcut(x)
        if skip is not x:
            # Some CPU backends run a 1x1x1 conv in NCDHW whatever the input's layout; keep the block's.
            skip = skip.contiguous(memory_format=layout_of(x))
        return skip + h


class ModalityStems(nn.ModuleDict):
    """One input conv per modality; a mixed batch is split by modality and reassembled in order.

    ``channels_last`` (set by ``use_channels_last``): emit NDHWC features. It must be said here:
    a one-channel image and a one-input-channel weight are both layouts at once, so the
    convolution alone would fall back to NCDHW.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__({name: conv3d(1, cfg.channels[0]) for name in cfg.modalities})
        self.names = tuple(cfg.modalities)
        self.channels_last = False

    def forward(self, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        if modality.dim() != 1 or modality.shape[0] != image.shape[0]:
            raise ModelError(f"modality must be a [B] index tensor for B={image.shape[0]}, got {tuple(modality.shape)}")
        layout = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        # Routing reads the indices on the host: a CPU ``modality`` (as the training loop passes)
        # costs no GPU synchronisation; a GPU one waits for the device once.
        modality = modality.cpu()
        present = torch.unique(modality).tolist()
        if len(present) == 1:  # the common case: no gather/scatter copies
            return self[self._name(present[0])](image).contiguous(memory_format=layout)
        out: torch.Tensor | None = None
        for index in present:
            rows = (modality == index).nonzero(as_tuple=True)[0].to(image.device, non_blocking=True)
            part = self[self._name(index)](image.index_select(0, rows))
            if out is None:
                out = torch.empty((image.shape[0],) + part.shape[1:], dtype=part.dtype, device=part.device,
                                  memory_format=layout)
            out.index_copy_(0, rows, part)
        assert out is not None
        return out

    def _name(self, index: int) -> str:
        if not 0 <= index < len(self.names):
            raise ModelError(f"modality index {index} out of range; the model knows {list(self.names)}")
        return self.names[index]


class EncoderStage(nn.Module):
    def __init__(self, level: int, in_ch: int, out_ch: int, cfg: ModelConfig) -> None:
        super().__init__()
        # Level 0 keeps full resolution; deeper levels halve it with a strided conv.
        self.down = conv3d(in_ch, out_ch, stride=2) if level > 0 else nn.Identity()
        self.blocks = nn.ModuleList(
            PreActResBlock(out_ch, out_ch, cfg, film_key=f"encoder_{level}_{b}") for b in range(cfg.blocks_per_stage)
        )

    def forward(self, x: torch.Tensor, films: FilmParams) -> torch.Tensor:
        x = self.down(x)
        for block in self.blocks:
            x = block(x, films)
        return x


class Encoder(nn.Module):
    """Stages at widths ``cfg.channels``; returns every stage's output (the last is F_dense)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.channels
        self.stages = nn.ModuleList(
            EncoderStage(level, widths[max(level - 1, 0)], widths[level], cfg) for level in range(len(widths))
        )

    def forward(self, x: torch.Tensor, films: FilmParams) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x, films)
            features.append(x)
        return features

    def film_slots(self) -> dict[str, int]:
        return {b.film_key: b.conv2.conv.out_channels for s in self.stages for b in s.blocks if b.film_key}


class DecoderStage(nn.Module):
    def __init__(self, level: int, cfg: ModelConfig, film_last: bool) -> None:
        super().__init__()
        deep, width = cfg.channels[level + 1], cfg.channels[level]
        # The channel-reducing conv runs at the coarse resolution before interpolation: 8x fewer
        # multiply-adds than convolving the upsampled map, and no ConvTranspose (which LoRA cannot wrap).
        self.up = conv3d(deep, width, kernel=3)
        blocks = []
        for b in range(cfg.blocks_per_stage):
            last = b == cfg.blocks_per_stage - 1
            key = None if (last and not film_last) else f"decoder_{level}_{b}"
            blocks.append(PreActResBlock(2 * width if b == 0 else width, width, cfg, film_key=key))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, films: FilmParams) -> torch.Tensor:
        x = F.interpolate(self.up(x), size=skip.shape[2:], mode="trilinear", align_corners=False)
        # Interpolation may return NCDHW for an NDHWC input; follow the skip's layout so the
        # concatenation (and the 1x1x1 shortcut conv after it) stay in the network's layout.
        x = torch.cat([x.contiguous(memory_format=layout_of(skip)), skip], dim=1)
        for block in self.blocks:
            x = block(x, films)
        return x


class Decoder(nn.Module):
    """Upsampling path to full resolution, ending in ``head_channels`` features for the dynamic head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        levels = list(range(len(cfg.channels) - 2, -1, -1))
        # FiLM in every decoder block except the very last one (the paper's layout).
        self.stages = nn.ModuleList(DecoderStage(level, cfg, film_last=level != 0) for level in levels)
        self.out_norm = make_norm(cfg.norm, cfg.channels[0])
        self.out_act = get_act_layer(cfg.act)
        self.out = conv3d(cfg.channels[0], cfg.head_channels, kernel=1)

    def forward(self, features: list[torch.Tensor], films: FilmParams) -> torch.Tensor:
        x = features[-1]
        for stage, skip in zip(self.stages, reversed(features[:-1])):
            x = stage(x, skip, films)
        return self.out(self.out_act(self.out_norm(x)))

    def film_slots(self) -> dict[str, int]:
        return {b.film_key: b.conv2.conv.out_channels for s in self.stages for b in s.blocks if b.film_key}
