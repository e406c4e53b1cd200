"""From collated patch batches to model inputs: prompt embeddings looked up once, moved to the device.

The text encoder never runs here: every text is looked up in the prompt cache before training starts.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from duplus.errors import PromptError
from duplus.train.losses import masked_loss
from duplus.train.optim import autocast


class TextTable:
    """Embeddings of a fixed set of texts on the training device, plus a zero row for padding."""

    def __init__(self, cache: Any, texts: Sequence[str], device: torch.device) -> None:
        self.texts = list(dict.fromkeys(texts))
        self.index = {text: i for i, text in enumerate(self.texts)}
        if not self.texts:
            raise PromptError("no prompt text to look up")
        vectors = cache.get_many(self.texts).detach().to(torch.float32).cpu()
        if vectors.shape[0] != len(self.texts):
            raise PromptError(f"prompt cache returned {vectors.shape[0]} vectors for {len(self.texts)} texts")
        self.dim = int(vectors.shape[1])
        self.matrix = torch.cat([vectors, torch.zeros(1, self.dim)]).to(device)
        self.pad = len(self.texts)
        self.device = device

    def _rows(self, texts: Sequence[str]) -> list[int]:
        try:
            return [self.index[t] for t in texts]
        except KeyError as error:
            raise PromptError(f"prompt {error.args[0]!r} was not looked up before training") from None

    def mean(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean embedding [T] of ``texts``."""
        rows = torch.tensor(self._rows(texts), dtype=torch.long)
        return self.matrix[rows.to(self.device)].mean(dim=0)

    def context(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, T] context embeddings."""
        rows = torch.tensor(self._rows(texts), dtype=torch.long)
        return self.matrix[rows.to(self.device, non_blocking=True)]

    def targets(self, texts: Sequence[Sequence[str]], k: int) -> torch.Tensor:
        """[B, k, T] target embeddings; rows beyond a sample's classes are zeros (weight-0 padding)."""
        rows = torch.full((len(texts), k), self.pad, dtype=torch.long)
        for b, sample in enumerate(texts):
            rows[b, : len(sample)] = torch.tensor(self._rows(sample), dtype=torch.long)
        return self.matrix[rows.to(self.device, non_blocking=True)]


def batch_loss(
    model: nn.Module,
    batch: dict[str, Any],
    table: TextTable,
    amp: torch.dtype | None,
    weight_total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward one collated batch and return its masked Dice + BCE loss (0-dim, on the device).

    ``weight_total`` maps this batch's class weights to the loss divisor (data-parallel training
    sums them over ranks); by default the batch's own sum.
    """
    device = table.device
    image = batch["image"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True).float()  # uint8 masks from the loader
    weight = batch["class_weight"].to(device, non_blocking=True)
    modality = batch["modality"]  # stays on the host: the stems route on it without a GPU sync
    context = table.context(batch["context"])
    targets = table.targets(batch["target_texts"], target.shape[1])
    with autocast(device, amp):
        logits = model(image, modality, context, targets)
    return masked_loss(logits, target, weight, weight_total(weight) if weight_total is not None else None)


def accumulated_loss(
    model: nn.Module,
    micro_batches: Sequence[dict[str, Any]],
    table: TextTable,
    amp: torch.dtype | None,
    backward: Callable[[torch.Tensor], None],
    global_total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward and ``backward`` the micro-batches of one optimizer step as if they were one batch.

    Each micro-batch's loss is divided by the class weights of the whole step (``global_total``
    maps them to the divisor: data-parallel training sums them over ranks), so the gradients add
    up to one batch's. Dividing each by its own weights and by their number would weight a class
    in a micro-batch of 2 supervised classes 13 times more than in one of 26. Returns the step's
    loss (0-dim, detached, on the device; no host sync).
    """
    weight = torch.stack([batch["class_weight"].sum() for batch in micro_batches]).sum()
    weight = weight.to(table.device, non_blocking=True)
    total = global_total(weight) if global_total is not None else weight
    step = torch.zeros((), device=table.device)
    for batch in micro_batches:
        loss = batch_loss(model, batch, table, amp, lambda _: total)
        backward(loss)
        step += loss.detach()
    return step


def open_prompt_cache(prompt_cache: Any) -> Any:
    """A loaded prompt cache: a path is opened with ``PromptCache.load``; a loaded cache is returned."""
    if hasattr(prompt_cache, "get_many") and hasattr(prompt_cache, "dim"):
        return prompt_cache
    from duplus.prompts.cache import PromptCache

    return PromptCache.load(prompt_cache)
