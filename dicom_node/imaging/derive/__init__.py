"""Derived DICOM objects: fused series, registered MR series, Spatial Registration object.

The only package of the node that creates DICOM objects. Everything made here:

* lives in the CT's study and Frame of Reference, with the Patient and General Study modules
  copied from the CT (the CT is the planning reference the TPS already holds);
* gets UIDs under a configurable root (``derive.uid_root``; ``"2.25"`` means UUID-derived
  ``2.25.<128-bit decimal>``), computed by hashing the SOP Instance UIDs of both inputs, the
  object kind, a ``salt`` (job / software version) and a ``revision``. Re-running a job yields
  the same UIDs, so receivers see the same objects rather than duplicates; pass a new
  ``revision`` when a series must replace an earlier, different one;
* gets a series number ``series_number_base + 10 * revision + k`` (k = 1 fused, 2 registered
  MR, 3 REG): deterministic, never random.

IOD of the fused series: **MR Image Storage** with ImageType ``DERIVED\\SECONDARY``. Why:
it must not be importable as a planning CT (so not CT Image Storage: a TPS would offer it for
dose calculation with meaningless "HU"), yet every common TPS (Eclipse, RayStation, Monaco,
Pinnacle) imports MR Image Storage as a secondary image set with full geometry (Image Plane
module, Frame of Reference) that can be registered, contoured on and fused. Secondary Capture
(single or multi-frame) has no mandatory Image Plane module or Frame of Reference, and several
TPSs either refuse SC images or import them without geometry, so they could not be overlaid
on the planning CT. Enhanced MR is imported by fewer TPS versions than classic MR.
"""

from __future__ import annotations

from dicom_node.imaging.derive.common import DeriveOptions, derive_uid, fit_lo, series_number
from dicom_node.imaging.derive.images import fused_series, registered_mr_series
from dicom_node.imaging.derive.registration import spatial_registration

__all__ = [
    "DeriveOptions",
    "derive_uid",
    "fit_lo",
    "fused_series",
    "registered_mr_series",
    "series_number",
    "spatial_registration",
]
