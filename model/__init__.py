"""GMFlow models on top of ``gmkernels``: networks (:class:`GMDiT`, :class:`GMMLP2D`), data,
presets, the training loop (``python -m model.train``) and evaluation (``python -m model.evaluate``).
Runs from a checkout (not part of the installed wheel); needs the ``model`` extra."""

from .networks import GMMLP2D, DiTConfig, GMDiT, MLP2DConfig, build_network

__all__ = ["GMDiT", "GMMLP2D", "DiTConfig", "MLP2DConfig", "build_network"]
