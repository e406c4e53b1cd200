"""Constants and helpers shared by the model tests (imported by module name)."""

import torch

TEXT_DIM = 16


def randomize_film(model, scale: float = 0.5) -> None:
    """FiLM generators start as identity; give them weights so that the context matters."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for film in model.film.values():
            film.out.weight.copy_(torch.randn(film.out.weight.shape, generator=generator) * scale)
