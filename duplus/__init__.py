"""DuPLUS: dual-prompt universal 3D medical image segmentation, LoRA adaptation and prognosis."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `duplus.segment_images` without importing torch and the model stack with the package itself
    # (`duplus list-classes` and argument errors stay instant).
    if name == "segment_images":
        from duplus.segment.api import segment_images

        return segment_images
    raise AttributeError(f"module 'duplus' has no attribute {name!r}")
