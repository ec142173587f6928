"""Image side of the MR-CT fusion node: Res2Net fusion, registration, metrics.

This package never imports pynetdicom, pydicom, highdicom or SQLAlchemy: numpy arrays
and SimpleITK images are what cross the border to ``dicom_node``.

The public names below are re-exported lazily (PEP 562 ``__getattr__``), so
``import fusion_engine`` stays cheap: torch and SimpleITK load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from fusion_engine.defaults import DEFAULT_BATCH_SIZE, DEFAULT_CT_WINDOW, DEFAULT_STRATEGY

_EXPORTS: dict[str, str] = {
    "fuse": "fusion_engine.inference",
    "STRATEGIES": "fusion_engine.inference",
    "MODEL_VERSION": "fusion_engine.inference",
    "ct_to_unit": "fusion_engine.intensity",
    "mr_to_unit": "fusion_engine.intensity",
    "mr_scale": "fusion_engine.intensity",
    "register": "fusion_engine.registration",
    "resample_to": "fusion_engine.registration",
    "reg_matrix_mr_to_ct": "fusion_engine.registration",
    "RegistrationResult": "fusion_engine.registration",
    "RegistrationQuality": "fusion_engine.registration",
    "fuse_volume": "fusion_engine.volume",
    "FusionEngineError": "fusion_engine.errors",
    "WeightsError": "fusion_engine.errors",
    "InputError": "fusion_engine.errors",
    "RegistrationError": "fusion_engine.errors",
    "UnreliableRegistrationError": "fusion_engine.errors",
    "check_transform": "fusion_engine.registration",
}

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CT_WINDOW",
    "DEFAULT_STRATEGY",
    "MODEL_VERSION",
    "STRATEGIES",
    "FusionEngineError",
    "InputError",
    "RegistrationError",
    "RegistrationQuality",
    "RegistrationResult",
    "UnreliableRegistrationError",
    "WeightsError",
    "__version__",
    "check_transform",
    "ct_to_unit",
    "fuse",
    "fuse_volume",
    "mr_scale",
    "mr_to_unit",
    "reg_matrix_mr_to_ct",
    "register",
    "resample_to",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from fusion_engine.errors import (
        FusionEngineError,
        InputError,
        RegistrationError,
        UnreliableRegistrationError,
        WeightsError,
    )
    from fusion_engine.inference import MODEL_VERSION, STRATEGIES, fuse
    from fusion_engine.intensity import ct_to_unit, mr_scale, mr_to_unit
    from fusion_engine.registration import (
        RegistrationQuality,
        RegistrationResult,
        check_transform,
        reg_matrix_mr_to_ct,
        register,
        resample_to,
    )
    from fusion_engine.volume import fuse_volume


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fusion_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
