"""Exception classes of the fusion engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusion_engine.registration import RegistrationQuality


class FusionEngineError(Exception):
    """Base class of every error raised by fusion_engine."""


class WeightsError(FusionEngineError):
    """Shipped weights are missing or fail their checksum."""


class InputError(FusionEngineError, ValueError):
    """An input array or image has the wrong shape, type or range."""


class RegistrationError(FusionEngineError):
    """Registration could not run or its result is unreliable.

    ``quality`` is the :class:`fusion_engine.registration.RegistrationQuality` of the rejected
    result when there was one (``None`` when registration could not run at all).
    """

    def __init__(self, message: str, *, quality: RegistrationQuality | None = None) -> None:
        super().__init__(message)
        self.quality = quality
