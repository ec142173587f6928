"""Run the ``dicom-node`` command as ``python -m dicom_node.cli``."""

import sys

from dicom_node.cli import main

sys.exit(main())
