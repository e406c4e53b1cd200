"""Feature-wise linear modulation (FiLM) steered by the context prompt (T1).

A generator maps the projected T1 embedding to per-channel (gamma, beta); a block applies x*(1+gamma)+beta.
"""

from __future__ import annotations

import torch
from monai.networks.layers import get_act_layer
from torch import nn


class FiLMGenerator(nn.Module):
    """MLP: context embedding [B, E] -> (gamma [B, C], beta [B, C])."""

    def __init__(self, embed_dim: int, channels: int, hidden: int | None = None, act: str = "elu") -> None:
        super().__init__()
        hidden = hidden or embed_dim
        self.channels = channels
        self.hidden = nn.Linear(embed_dim, hidden)
        self.act = get_act_layer(act)
        self.out = nn.Linear(hidden, 2 * channels)
        # Zero output layer: every block starts as the unmodulated network (gamma = beta = 0),
        # so early training is as stable as a plain U-Net and the context is learned in gradually.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma, beta = self.out(self.act(self.hidden(context))).chunk(2, dim=-1)
        return gamma, beta


def apply_film(x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """x * (1 + gamma) + beta with gamma, beta [B, C] broadcast over the spatial axes."""
    if film is None:
        return x
    gamma, beta = film
    shape = gamma.shape + (1,) * (x.dim() - 2)
    # One pass over the map (x * scale + beta), not a multiply and then an add.
    return torch.addcmul(beta.reshape(shape).to(x.dtype), x, (1 + gamma.reshape(shape)).to(x.dtype))


def apply_film_(x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``apply_film`` written into ``x`` (a map its caller owns, outside autograd): the same op, no new map."""
    if film is None:
        return x
    gamma, beta = film
    shape = gamma.shape + (1,) * (x.dim() - 2)
    return torch.addcmul(beta.reshape(shape).to(x.dtype), x, (1 + gamma.reshape(shape)).to(x.dtype), out=x)


def build_film_bank(slots: dict[str, int], embed_dim: int, hidden: int | None, act: str) -> nn.ModuleDict:
    """One generator per FiLM slot (name -> channels), e.g. ``encoder_2_1`` -> 128."""
    return nn.ModuleDict({name: FiLMGenerator(embed_dim, c, hidden, act) for name, c in slots.items()})
