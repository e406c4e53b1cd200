"""Text-conditioned segmentation head: the controller writes the weights of a per-class dynamic head.

Controller: GAP(F_dense) ++ projected T2 -> 153 numbers per class; the dynamic head runs 8->8->8->1 1x1x1 convs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import get_act_layer
from torch import nn

from duplus.errors import ModelError
from duplus.model.backbone import conv3d, make_norm
from duplus.model.config import ModelConfig

# Upper bound on the elements of one hidden activation [B, K*C, voxels] of the dynamic head; voxels
# are processed in chunks below it. On a GPU the bound keeps 32+ prompts on a 128^3 window within
# memory; on a CPU a chunk that stays in cache runs the K-class head 3-4x faster than one pass.
HIDDEN_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 20}


class Controller(nn.Module):
    """Maps (bottleneck, projected class embeddings [B, K, E]) -> dynamic head parameters [B, K, P]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.image_norm = make_norm(cfg.controller_norm, cfg.bottleneck_channels)
        self.image_act = get_act_layer(cfg.act)
        self.image_proj = conv3d(cfg.bottleneck_channels, cfg.embed_dim, kernel=1)
        self.params = nn.Linear(2 * cfg.embed_dim, cfg.n_dynamic_params)
        _init_as_head(self.params, cfg.head_channels)

    def pooled(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """GAP of the projected bottleneck: the image summary [B, E] the class weights are made from."""
        projected = self.image_proj(self.image_act(self.image_norm(bottleneck)))
        return projected.mean(dim=tuple(range(2, projected.dim())))

    def forward(self, bottleneck: torch.Tensor, class_embed: torch.Tensor) -> torch.Tensor:
        image = self.pooled(bottleneck)  # [B, E]
        k = class_embed.shape[1]
        joint = torch.cat([image.unsqueeze(1).expand(-1, k, -1), class_embed.to(image.dtype)], dim=-1)
        return self.params(joint)


def _init_as_head(layer: nn.Linear, channels: int) -> None:
    """Start the generated convs as a He-initialised C->C->C->1 head.

    With PyTorch's default Linear init alone the generated weights are ~0.1, the three stacked
    1x1x1 convs shrink the features to nearly constant logits and almost no gradient reaches the
    backbone: training stalls for hundreds of steps. A He-scaled random head in the bias makes the
    initial head a well-conditioned MLP; the weight part (default init, fed layer-normalised class
    embeddings) gives each class its own head of the same scale from the first step.
    """
    c = channels
    with torch.no_grad():
        layer.bias.zero_()
        layer.bias[: c * c].normal_(0.0, (2.0 / c) ** 0.5)  # w1
        layer.bias[c * c : 2 * c * c].normal_(0.0, (2.0 / c) ** 0.5)  # w2
        layer.bias[2 * c * c : 2 * c * c + c].normal_(0.0, (1.0 / c) ** 0.5)  # w3


class DynamicHead(nn.Module):
    """Applies per-sample, per-class 1x1x1 convs C->C->C->1 (ReLU between) as batched matmuls."""

    def __init__(self, head_channels: int) -> None:
        super().__init__()
        c = head_channels
        self.channels = c
        # Weights first, then biases: the layout of the CLIP-Driven Universal Model's controller.
        self.splits = (c * c, c * c, c, c, c, 1)

    def forward(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        b, c = features.shape[:2]
        spatial = features.shape[2:]
        if c != self.channels:
            raise ModelError(f"dynamic head expects {self.channels} feature channels, got {c}")
        if params.shape[0] != b or params.shape[-1] != sum(self.splits):
            raise ModelError(f"dynamic params must be [B={b}, K, {sum(self.splits)}], got {tuple(params.shape)}")
        k = params.shape[1]
        x = features.reshape(b, c, -1)  # [B, C, V]
        budget = HIDDEN_ELEMENTS.get(features.device.type, HIDDEN_ELEMENTS["cuda"])
        chunk = max(1024, budget // (b * k * c))
        weights = self._split(params.to(x.dtype))
        voxels = x.shape[-1]
        if chunk >= voxels:
            logits = self._run(x, *weights)
        elif torch.is_grad_enabled():
            logits = torch.cat([self._run(x[..., i : i + chunk], *weights) for i in range(0, voxels, chunk)], dim=-1)
        else:
            # Without autograd each chunk goes straight to its place: concatenating the chunks
            # at the end would hold the logits twice (2 x 268 MB for 32 prompts on a 128^3 window).
            logits = x.new_empty((b, k, voxels), dtype=torch.result_type(x, weights[0]))
            for i in range(0, voxels, chunk):
                logits[..., i : i + chunk] = self._run(x[..., i : i + chunk], *weights)
        return logits.reshape(b, k, *spatial)

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, K, P] -> w1 [B, K*C, C], b1 [B, K*C, 1], w2 [B*K, C, C], b2 [B*K, C, 1], w3 [B*K, 1, C], b3 [B*K, 1, 1]."""
        b, k, _ = params.shape
        c = self.channels
        w1, w2, w3, b1, b2, b3 = params.split(self.splits, dim=-1)
        return (w1.reshape(b, k * c, c), b1.reshape(b, k * c, 1), w2.reshape(b * k, c, c), b2.reshape(b * k, c, 1),
                w3.reshape(b * k, 1, c), b3.reshape(b * k, 1, 1))

    def _run(self, x: torch.Tensor, w1, b1, w2, b2, w3, b3) -> torch.Tensor:
        """[B, C, V] -> logits [B, K, V]; the first layer of all K classes is one matmul on the shared features."""
        b = x.shape[0]
        c = self.channels
        h = F.relu_(torch.baddbmm(b1, w1, x))  # [B, K*C, V]
        h = F.relu_(torch.baddbmm(b2, w2, h.reshape(w2.shape[0], c, -1)))  # [B*K, C, V]
        return torch.baddbmm(b3, w3, h).reshape(b, -1, x.shape[-1])
