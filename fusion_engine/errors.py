"""Exception classes of the fusion engine."""


class FusionEngineError(Exception):
    """Base class of every error raised by fusion_engine."""


class WeightsError(FusionEngineError):
    """Shipped weights are missing or fail their checksum."""


class InputError(FusionEngineError, ValueError):
    """An input array or image has the wrong shape, type or range."""


class RegistrationError(FusionEngineError):
    """Registration could not run or its result is unreliable."""
