"""Who made a derived object: the Manufacturer values the node stamps on everything it derives.

A module of constants only (no imaging libraries), so the parts of the node that must recognise
their own output coming back from a PACS (prefetch) can import it cheaply.
"""

from __future__ import annotations

MANUFACTURER = "mrct-fusion-node"
"""General Equipment Manufacturer of every derived object."""
MODEL_NAME = "MR-CT fusion node"
"""Manufacturer's Model Name of every derived object."""
