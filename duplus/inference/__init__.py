"""Sliding-window inference shared by ``duplus segment`` and evaluation: windows, streaming blending,
bit-packed masks and the boundary probabilities that restore them (``predict.predict_masks``)."""
