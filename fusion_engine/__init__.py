"""Image side of the MR-CT fusion node: Res2Net fusion, registration, metrics.

This package never imports pynetdicom, pydicom, highdicom or SQLAlchemy: numpy arrays
and SimpleITK images are what cross the border to ``dicom_node``.
"""

__version__ = "0.1.0"
