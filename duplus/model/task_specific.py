"""The task-specific baseline: DuPLUS's backbone trained on one dataset, with no prompt at all.

The same stems, residual encoder and decoder as the universal network, but FiLM is switched off and
a static 1x1x1 conv gives one channel per class of that dataset (the nnU-Net-style setting the
paper compares against). It keeps the universal network's call signature, so training, sliding-
window inference and evaluation run it unchanged; the prompt arguments are accepted and ignored.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import nn

from duplus.errors import ModelError
from duplus.model.backbone import Decoder, Encoder, ModalityStems
from duplus.model.config import ModelConfig

ARCHITECTURE = "task_specific"


class TaskSpecificNet(nn.Module):
    """Residual U-Net with a fixed class set; ``classes`` gives the order of the output channels."""

    def __init__(self, cfg: ModelConfig, classes: Sequence[str]) -> None:
        super().__init__()
        if not classes:
            raise ModelError("a task-specific network needs at least one class")
        self.cfg = cfg
        self.classes = [str(c) for c in classes]
        self.stems = ModalityStems(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.head = nn.Conv3d(cfg.head_channels, len(self.classes), kernel_size=1)
        # Every FiLM slot reads as "no modulation": the blocks become plain pre-activation blocks.
        self._no_film: defaultdict[str, None] = defaultdict(lambda: None)

    def forward(
        self,
        image: torch.Tensor,
        modality: torch.Tensor,
        context: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, K, Z, Y, X] for the K classes the network was trained on.

        ``targets`` only tells how many classes the caller expects: it must be all of them, in the
        training order (a fixed head cannot answer a prompt it was not trained for).
        """
        if image.dim() != 5 or image.shape[1] != 1:
            raise ModelError(f"image must be [B, 1, Z, Y, X], got {tuple(image.shape)}")
        if targets is not None and targets.shape[-2] != len(self.classes):
            raise ModelError(
                f"this task-specific network predicts exactly its {len(self.classes)} classes {self.classes}; "
                f"{targets.shape[-2]} were asked for"
            )
        skips = self.encoder(self.stems(image, modality), self._no_film)
        return self.head(self.decoder(skips, self._no_film))

    def encode(self, image: torch.Tensor, modality: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Bottleneck features [B, C, z, y, x], as ``DuPLUS.encode``."""
        return self.encoder(self.stems(image, modality), self._no_film)[-1]
