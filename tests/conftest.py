"""Root fixtures shared by every test area (area fixtures live in tests/<area>/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.orthanc import Orthanc, require_orthanc


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Orthanc]]:
    """Make started Orthanc servers (keywords as for ``Orthanc``); all killed at teardown."""
    require_orthanc()
    made: list[Orthanc] = []

    def make(**kwargs: Any) -> Orthanc:
        server = Orthanc(tmp_path_factory.mktemp("orthanc"), **kwargs)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop(graceful=False)


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    """A fresh, started Orthanc (AE ``ORTHANC``, accepts any caller) on free loopback ports."""
    return orthanc_factory()
