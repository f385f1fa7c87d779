"""Networks of the public GMFlow checkpoints as diffusers models (needs the ``diffusers`` extra)."""

from .gmdit import GMDiTTransformer2DModel, SpectrumMLP

__all__ = ["GMDiTTransformer2DModel", "SpectrumMLP"]
