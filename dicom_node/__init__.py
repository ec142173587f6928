"""DICOM side of the MR-CT fusion node: receive, store, pair, derive and send."""

__version__ = "0.1.0"
