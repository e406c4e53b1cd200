"""3D residual U-Net of DuPLUS: one input stem per modality, FiLM-modulated pre-activation blocks.

Encoder stages downsample with stride-2 convs; the decoder upsamples trilinearly and concatenates skips.
Without autograd the same math runs in place where it can (``no_grad`` / ``inference_mode``: inference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers import get_act_layer, get_norm_layer
from torch import nn

from duplus.errors import ModelError
from duplus.model.config import ModelConfig
from duplus.model.film import apply_film, apply_film_

FilmParams = dict[str, tuple[torch.Tensor, torch.Tensor]]


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for an NDHWC tensor (that is not also NCDHW), else the default layout."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def use_channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch a DuPLUS (or task-specific) network to channels-last (NDHWC), in place; returns it.
    ``enabled=False`` switches it back to the default layout (NCDHW).

    cuDNN's tensor-core kernels for bf16/fp16 3-D convolutions then need no layout transposes, and
    oneDNN's CPU convolutions no reorders of their input and output (``duplus.inference.predict``
    infers on a CPU in NDHWC). Outputs equal the default layout's up to float rounding; on a GPU
    only speed differs, which depends on the GPU and on ``torch.compile`` (``bench/train_step.py``
    measures it), so for training it is a switch.
    """
    model.to(memory_format=torch.channels_last_3d if enabled else torch.contiguous_format)
    for module in model.modules():
        if isinstance(module, ModalityStems):
            module.channels_last = enabled
    return model


def is_channels_last(model: nn.Module) -> bool | None:
    """Whether the network emits NDHWC maps (``use_channels_last``); None if it has no modality stems."""
    stems = [m for m in model.modules() if isinstance(m, ModalityStems)]
    return any(stem.channels_last for stem in stems) if stems else None


def overwrites(x: torch.Tensor) -> bool:
    """Whether a forward may overwrite the intermediates it made and drop them early.

    Only when no autograd graph is recorded (``no_grad``, ``inference_mode``): there every map a
    block makes is its own and read once, so norm, FiLM and activation rewrite it instead of each
    allocating a map of their own. On a CPU a fresh multi-MB tensor costs more in page faults than
    the elementwise op that fills it, and each one adds to the peak. Training builds its graph
    from the out-of-place ops, unchanged.
    """
    return not torch.is_grad_enabled() and not x.requires_grad


def act_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` written into ``x`` for the activations the configs name; any other runs as it is."""
    if type(act) is nn.ELU:
        return F.elu_(x, act.alpha)
    if type(act) is nn.ReLU:
        return F.relu_(x)
    if type(act) is nn.LeakyReLU:
        return F.leaky_relu_(x, act.negative_slope)
    return act(x)


def pointwise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution (``conv3d(..., kernel=1)``) on a CPU as one matrix product per sample.

    Torch runs a batch-1 1x1x1 Conv3d through oneDNN or its slow im2col path at about half the rate
    of ``addmm`` on the same [C_out, C_in] x [C_in, voxels] product (the shortcut of the first
    decoder block and the decoder's output conv run at full resolution). NCDHW and NDHWC maps keep
    their layout. Only without autograd; anything else (LoRA-wrapped convs, other devices, meta
    tensors for FLOP counting) calls the module.
    """
    conv = module.conv if isinstance(module, Convolution) and len(module) == 1 else None
    layout = layout_of(x) if x.dim() == 5 else None
    if (type(conv) is not nn.Conv3d or torch.is_grad_enabled() or x.device.type != "cpu" or x.dim() != 5
            or not x.is_contiguous(memory_format=layout)
            or conv.kernel_size != (1, 1, 1) or conv.stride != (1, 1, 1) or conv.padding != (0, 0, 0)
            or conv.dilation != (1, 1, 1) or conv.groups != 1 or x.dtype != conv.weight.dtype):
        return module(x)
    batch, channels = x.shape[:2]
    weight = conv.weight.reshape(conv.out_channels, channels)
    out = torch.empty((batch, conv.out_channels, *x.shape[2:]), dtype=x.dtype, memory_format=layout)
    for b in range(batch):
        if layout == torch.channels_last_3d:  # NDHWC: [voxels, C] rows, out = rows W^T (+ bias), layout kept
            left, right = x[b].permute(1, 2, 3, 0).view(-1, channels), weight.t()
            result, bias = out[b].permute(1, 2, 3, 0).view(-1, conv.out_channels), conv.bias
        else:  # NCDHW: [C, voxels], out = W x (+ bias)
            left, right = weight, x[b].view(channels, -1)
            result, bias = out[b].view(conv.out_channels, -1), None if conv.bias is None else conv.bias.view(-1, 1)
        if bias is None:
            torch.mm(left, right, out=result)
        else:
            torch.addmm(bias, left, right, out=result)
    return out


def norm_film_(norm: nn.Module, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``apply_film(norm(x), film)`` for a map ``x`` the caller owns and no longer needs (no autograd)."""
    if isinstance(norm, InstanceNorm3dKeepLayout) and norm.can_overwrite(x):
        return norm.normalize_(x, film)
    return apply_film_(norm(x), film)


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

    def can_overwrite(self, x: torch.Tensor) -> bool:
        """Whether ``normalize_`` takes ``x``: a dense float32 NCDHW or NDHWC map on a CPU, outside autograd."""
        return (x.dim() == 5 and not self.track_running_stats and x.dtype == torch.float32
                and x.device.type == "cpu" and not torch.is_grad_enabled()
                and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d)))

    def normalize_(self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``apply_film(self(x), film)`` written into ``x`` in one pass (see ``can_overwrite``).

        The statistics come from torch's batch-norm statistics kernel (what the native instance norm
        runs, on a [1, B*C, voxels] view); normalisation, affine and FiLM fold into one per-(sample,
        channel) scale and shift, so the map is read twice and written once, with no new map.
        """
        batch, channels = x.shape[:2]
        if x.is_contiguous():
            mean, var = torch.batch_norm_update_stats(x.view(1, batch * channels, -1), None, None, 0.0)
        else:  # NDHWC: that kernel's channels-last path sums in float32 (1.5e-3 off at 128^3); var_mean does not
            var, mean = torch.var_mean(x, dim=(2, 3, 4), correction=0)
        scale = torch.rsqrt(var.view(batch, channels) + self.eps)
        shift = -mean.view(batch, channels) * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        if film is not None:
            gamma, beta = film
            scale = scale * (1 + gamma.to(scale.dtype))
            shift = shift * (1 + gamma.to(shift.dtype)) + beta.to(shift.dtype)
        shape = (batch, channels, 1, 1, 1)
        return torch.addcmul(shift.view(shape), x, scale.view(shape), out=x)


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
        if overwrites(x):
            return self._forward_overwriting(x, films)
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

    def _forward_overwriting(self, x: torch.Tensor, films: FilmParams) -> torch.Tensor:
        """``forward``'s math without autograd: every map after the first norm is rewritten in place.

        ``x`` itself is read, never written (the caller's skip connection may be it).
        """
        film = films[self.film_key] if self.film_key is not None else None
        h = self._second_conv_(self.conv1(act_(self.act1, self.norm1(x))), film)
        return self._add_(h, self._shortcut(x))  # taken after conv2: no extra map is held through it

    def forward_consuming(self, maps: list[torch.Tensor], films: FilmParams) -> torch.Tensor:
        """``forward`` without autograd for an input the caller hands over: ``maps.pop()``.

        With a 1x1x1 shortcut the shortcut is taken first and the input is then normalised in place
        and freed after the first conv, instead of kept beside a normalised copy of itself: in the
        first full-resolution decoder block (64 channels at 128^3, 537 MB) that copy was the forward's
        largest map. Any other block, or an input ``normalize_`` cannot take, runs ``forward``.
        """
        x = maps.pop()
        if (not overwrites(x) or isinstance(self.shortcut, nn.Identity) or not isinstance(self.norm1, InstanceNorm3dKeepLayout)
                or not self.norm1.can_overwrite(x)):
            return self(x, films)
        film = films[self.film_key] if self.film_key is not None else None
        skip = self._shortcut(x)
        h = act_(self.act1, self.norm1.normalize_(x))  # the same map as x, rewritten
        del x  # the caller's reference went with maps.pop(): the map is freed once conv1 has read it
        h = self.conv1(h)
        return self._add_(self._second_conv_(h, film), skip)

    def _second_conv_(self, h: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """norm2, FiLM, activation (in place on ``h``, the first conv's output) and conv2."""
        return self.conv2(self.drop(act_(self.act2, norm_film_(self.norm2, h, film))))

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.shortcut, nn.Identity):
            return x
        # Some CPU backends run a 1x1x1 conv in NCDHW whatever the input's layout; keep the block's.
        return pointwise(self.shortcut, x).contiguous(memory_format=layout_of(x))

    @staticmethod
    def _add_(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if h.dtype != torch.result_type(skip, h) or h.shape != skip.shape:
            return skip + h  # mixed precision: the sum takes the wider type, as training's does
        return h.add_(skip)


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
        x = self.merge(x, skip)
        for block in self.blocks:
            x = block(x, films)
        return x

    def merge(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The deeper map, reduced to this width and upsampled, concatenated with the skip.

        Without autograd the skip is copied into the concatenation and this call's reference to it
        dropped before the upsampled map is made: a caller that hands the skip over (keeps no reference,
        as ``Decoder`` does) never has the two beside the concatenation together (at 128^3: 805 MB at
        most instead of 1,073 MB). The skip is read, never written.
        """
        if overwrites(skip):
            reduced = self.up(x)
            merged = torch.empty((skip.shape[0], reduced.shape[1] + skip.shape[1], *skip.shape[2:]), dtype=skip.dtype,
                                 device=skip.device, memory_format=layout_of(skip))
            merged[:, reduced.shape[1]:].copy_(skip)
            del skip
            upsampled = F.interpolate(reduced, size=merged.shape[2:], mode="trilinear", align_corners=False)
            merged[:, : reduced.shape[1]].copy_(upsampled)
            return merged
        x = F.interpolate(self.up(x), size=skip.shape[2:], mode="trilinear", align_corners=False)
        # Interpolation may return NCDHW for an NDHWC input; follow the skip's layout so the
        # concatenation (and the 1x1x1 shortcut conv after it) stay in the network's layout.
        return torch.cat([x.contiguous(memory_format=layout_of(skip)), skip], dim=1)


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
        """Decoder features from the encoder's ``features``.

        Without autograd (see ``overwrites``) the list is emptied as the maps are used, so each skip
        is freed once it is concatenated: callers take what they need from it (the bottleneck) first.
        """
        if overwrites(features[-1]):
            return self._forward_overwriting(features, films)
        x = features[-1]
        for stage, skip in zip(self.stages, reversed(features[:-1])):
            x = stage(x, skip, films)
        return self.out(self.out_act(self.out_norm(x)))

    def _forward_overwriting(self, features: list[torch.Tensor], films: FilmParams) -> torch.Tensor:
        x = features.pop()
        for stage in self.stages:
            # ``merge`` is called directly, not through Module.__call__ (whose argument tuple would
            # hold the skip to the end of the stage), so the full-resolution skip goes with the call.
            maps = [stage.merge(x, features.pop())]
            del x
            for block in stage.blocks:
                # The block takes the map out of ``maps``: nothing here holds it while the block runs.
                maps.append(block.forward_consuming(maps, films))
            x = maps.pop()
        # The last block's output is this loop's own map: its norm may overwrite it too.
        return pointwise(self.out, act_(self.out_act, norm_film_(self.out_norm, x, None)))

    def film_slots(self) -> dict[str, int]:
        return {b.film_key: b.conv2.conv.out_channels for s in self.stages for b in s.blocks if b.film_key}
