"""Size and layout of the DuPLUS network: presets (``tiny``, ``paper``) plus config overrides.

The text dimension is not a config key: it is taken from the prompt cache the model is built for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from duplus.errors import ConfigError
from duplus.settings import Settings

MODALITIES: tuple[str, ...] = ("CT", "MRI", "PET")
CONTROLLER_NORMS = ("group", "instance")


def dynamic_param_count(head_channels: int) -> int:
    """Weights and biases of the dynamic head per class: C*C + C*C + C*1 + C + C + 1."""
    c = head_channels
    return c * c + c * c + c + c + c + 1


@dataclass(frozen=True)
class ModelConfig:
    """Every number that fixes the network's parameter shapes (saved beside the weights)."""

    channels: tuple[int, ...] = (32, 64, 128, 256, 320)
    blocks_per_stage: int = 2
    text_dim: int = 512
    embed_dim: int = 256
    head_channels: int = 8
    modalities: tuple[str, ...] = MODALITIES
    norm: str = "instance"
    act: str = "elu"
    dropout: float = 0.0
    film_hidden: int | None = None  # hidden width of each FiLM generator; None = embed_dim
    # Norm before the controller's pooled image summary. A group norm, as in the CLIP-Driven
    # Universal Model, keeps each channel's level relative to its group; an instance norm zeroes
    # every channel's mean, so the average pooled after it no longer says how strongly a feature
    # is present (models saved before this field existed used "instance").
    controller_norm: str = "group"

    def __post_init__(self) -> None:
        # Lists come from YAML/JSON; the dataclass keeps tuples so it stays hashable and comparable.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "modalities", tuple(str(m) for m in self.modalities))
        self.validate()

    def validate(self, where: str = "model") -> None:
        """Raise ``ConfigError`` naming the first field that cannot build a network."""
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ConfigError(f"{where}.channels must list at least 2 positive widths, got {list(self.channels)}")
        for name in ("blocks_per_stage", "text_dim", "embed_dim", "head_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}.{name} must be a positive integer, got {value!r}")
        if self.film_hidden is not None and (not isinstance(self.film_hidden, int) or self.film_hidden < 1):
            raise ConfigError(f"{where}.film_hidden must be a positive integer or null, got {self.film_hidden!r}")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"{where}.modalities must be distinct names, got {list(self.modalities)}")
        if self.controller_norm not in CONTROLLER_NORMS:
            raise ConfigError(f"{where}.controller_norm must be one of {list(CONTROLLER_NORMS)}, "
                              f"got {self.controller_norm!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def n_dynamic_params(self) -> int:
        return dynamic_param_count(self.head_channels)

    @property
    def bottleneck_channels(self) -> int:
        return self.channels[-1]

    @property
    def downsample_factor(self) -> int:
        """Window sizes divisible by this give exact skip alignment (others are interpolated)."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["channels"] = list(self.channels)
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown model field(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"{where}: {error}") from error

    @classmethod
    def preset(cls, name: str, text_dim: int = 512) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], "text_dim": int(text_dim)})

    @classmethod
    def from_config(cls, config: Mapping[str, Any], text_dim: int) -> "ModelConfig":
        """Read ``config["model"]["preset"]`` and apply ``config["model"]["overrides"]``."""
        section = Settings.of(config).model
        name = section.preset
        if name not in PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got {name!r}")
        overrides = dict(section.overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key == "text_dim":
                raise ConfigError("model.overrides.text_dim cannot be set: it comes from the prompt cache's encoder")
            if key not in known:
                raise ConfigError(
                    f"model.overrides.{key} is not a model field; known: {sorted(known - {'text_dim'})}"
                )
        fields = {**PRESETS[name], **overrides, "text_dim": int(text_dim)}
        try:
            return cls(**fields)
        except ConfigError as error:
            raise ConfigError(f"model.overrides (preset {name!r}): {error}") from error
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.overrides (preset {name!r}): {error}") from error


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's residual U-Net: 32-64-128-256-320, two pre-activation blocks per stage.
    "paper": dict(channels=(32, 64, 128, 256, 320), blocks_per_stage=2, embed_dim=256),
    # Small enough to train a 32^3 patch on two CPU cores in the embedded demo.
    "tiny": dict(channels=(8, 16, 32, 64), blocks_per_stage=1, embed_dim=32),
}
