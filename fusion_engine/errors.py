"""Exception classes of the fusion engine.

This module is the bottom of the engine's dependency graph: it imports nothing from the rest of
the package. What a registration error carries is described by :class:`QualityReport`, which
:class:`fusion_engine.registration.RegistrationQuality` satisfies.
"""

from __future__ import annotations

from typing import Protocol


class QualityReport(Protocol):
    """The figures a registration error carries (see ``RegistrationQuality``)."""

    metric_value: float
    mask_dice: float
    angle_from_header_deg: float
    warnings: list[str]

    @property
    def reliable(self) -> bool:
        """True when every reliability check passed."""

    @property
    def reasons(self) -> list[str]:
        """Why the result is unreliable."""

    def summary(self) -> str:
        """The evidence of the reliability check in one line."""

    def to_dict(self) -> dict[str, object]:
        """The figures as JSON-ready data (flat: names to numbers, text, lists of text)."""


class FusionEngineError(Exception):
    """Base class of every error raised by fusion_engine."""


class WeightsError(FusionEngineError):
    """Shipped weights are missing or fail their checksum."""


class InputError(FusionEngineError, ValueError):
    """An input array or image has the wrong shape, type or range."""


class RegistrationError(FusionEngineError):
    """Registration could not run (nothing to register, optimiser failure) or, as
    :class:`UnreliableRegistrationError`, its result failed the reliability check.

    ``quality`` is the report of the rejected result when there was one.
    """

    def __init__(self, message: str, *, quality: QualityReport | None = None) -> None:
        super().__init__(message)
        self.quality = quality


class UnreliableRegistrationError(RegistrationError):
    """The registration ran but its result failed the reliability check (``quality`` set)."""

    def __init__(self, message: str, *, quality: QualityReport) -> None:
        super().__init__(message, quality=quality)
        self.quality: QualityReport = quality
