"""The fusion engine's defaults, defined once and importable without torch or SimpleITK.

``dicom_node.config`` builds its ``fusion`` section from these, so the node, the offline
command, the research code and the command line all agree on what "default" means.
"""

from __future__ import annotations

DEFAULT_BATCH_SIZE = 2
"""Slices per inference batch unless the caller says otherwise. With freed memory reused
(:mod:`fusion_engine.allocator`) larger batches were no faster on the CPU, only larger."""

LEARNED_STRATEGY = "learned-fusion"
"""Name of the trained fusion stage among the strategies
(:class:`fusion_engine.model.FusionStage`)."""

DEFAULT_STRATEGY = LEARNED_STRATEGY
"""The fusion rule used when none is named (see :data:`fusion_engine.model.FUSION_STRATEGIES`)."""

DEFAULT_CT_WINDOW: tuple[float, float] = (40.0, 400.0)
"""CT window (centre, width) in HU mapped to the network's [0, 1] input (a brain window)."""
