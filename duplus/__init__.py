"""DuPLUS: dual-prompt universal 3D medical image segmentation, LoRA adaptation and prognosis."""

__version__ = "0.1.0"
