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
# memory. On a CPU (bench/head_cpu.py, 2 cores shared with other jobs) each operation pays a wait for
# both threads, so few large chunks won: 2^24 ran 1 / 32 prompts on a 128^3 window 3.8x / 1.5x faster
# than 2^20, for two reused buffers of at most 2 x 75 MB; alone on one thread 2^19 was best.
HIDDEN_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 24}
# Training on a CPU keeps the bound it was measured and tested with (its chunks run with autograd,
# not through the folded path above), so its losses stay the same to the last bit.
AUTOGRAD_CPU_ELEMENTS = 1 << 20


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
        if torch.is_grad_enabled() and features.device.type == "cpu":
            budget = AUTOGRAD_CPU_ELEMENTS
        chunk = max(1024, budget // (b * k * c))
        params = params.to(x.dtype)
        voxels = x.shape[-1]
        if not torch.is_grad_enabled() and x.device.type == "cpu":
            # Measured on CPUs only (bench/head_cpu.py); elsewhere the head runs as it did.
            return self._run_folded(x, params, chunk).reshape(b, k, *spatial)
        weights = self._split(params)
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

    def _folded(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, K, P] -> the three layers with their biases as an extra input column (a ones row of the input).

        Layers 1 and 2 get an extra output row (0, ..., 0, 1) as well: it copies the ones row through,
        exactly (1 * 1 plus zeros; ReLU keeps it), so each layer's output is the next one's input as it is.
        Returns a1 [B, K*(C+1), C+1], a2 [B*K, C+1, C+1], a3 [B*K, 1, C+1].
        """
        b, k, _ = params.shape
        c = self.channels
        w1, w2, w3, b1, b2, b3 = params.split(self.splits, dim=-1)
        layers = []
        for w, bias in ((w1, b1), (w2, b2)):
            a = params.new_zeros((b, k, c + 1, c + 1))
            a[..., :c, :c] = w.reshape(b, k, c, c)
            a[..., :c, c] = bias
            a[..., c, c] = 1.0
            layers.append(a)
        a3 = torch.cat([w3, b3], dim=-1)
        return layers[0].reshape(b, k * (c + 1), c + 1), layers[1].reshape(b * k, c + 1, c + 1), a3.reshape(b * k, 1, c + 1)

    def _run_folded(self, x: torch.Tensor, params: torch.Tensor, chunk: int) -> torch.Tensor:
        """The head without autograd: [B, C, V] -> logits [B, K, V], voxel chunk by voxel chunk.

        Same math as ``_run`` up to float rounding. With the biases inside the matrix products,
        ``bmm`` writes each layer into buffers allocated once and reused for every chunk, and the last
        layer writes straight into its slice of the logits: ``baddbmm`` would first copy its broadcast
        bias into a fresh output per layer and chunk, and a chunk's logits would be copied once more.
        """
        b, c, voxels = x.shape
        k = params.shape[1]
        a1, a2, a3 = self._folded(params)
        logits = x.new_empty((b, k, voxels))
        out = logits.view(b * k, 1, voxels)
        n = min(chunk, voxels)
        # The features with their ones row, once for all chunks (1/C more than the features): fewer
        # operations per chunk, which is what counts where other jobs share the cores.
        xa = x.new_ones((b, c + 1, voxels))
        xa[:, :c] = x
        # Flat storage: the last, shorter chunk takes contiguous views of the same memory.
        h1_buffer = x.new_empty(b * k * (c + 1) * n)
        h2_buffer = x.new_empty(b * k * (c + 1) * n)
        for i in range(0, voxels, n):
            m = min(n, voxels - i)
            h1 = torch.bmm(a1, xa[..., i : i + m], out=h1_buffer[: b * k * (c + 1) * m].view(b, k * (c + 1), m))
            h1.clamp_min_(0.0)
            h2 = torch.bmm(a2, h1.view(b * k, c + 1, m), out=h2_buffer[: b * k * (c + 1) * m].view(b * k, c + 1, m))
            torch.bmm(a3, h2.clamp_min_(0.0), out=out[..., i : i + m])
        return logits
