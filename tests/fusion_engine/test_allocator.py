"""reuse_freed_memory: freed activations are reused inside the block, released after it."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from fusion_engine import allocator
from fusion_engine.inference import fuse

pytestmark = pytest.mark.skipif(not allocator.supported(), reason="needs glibc's mallopt")


def _faults_of_one_fusion(ct: np.ndarray, mr: np.ndarray) -> int:
    """Minor page faults taken by one fusion of the pair (about one per 4 KiB newly touched)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fuse(ct, mr, device="cpu")
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_reused_inside_and_released_after() -> None:
    rng = np.random.default_rng(0)
    ct, mr = rng.random((2, 2, 256, 256), dtype=np.float32)
    cold = _faults_of_one_fusion(ct, mr)  # fuse() alone: its working set is paged in
    assert cold > 10_000  # activations of 2 x 2 x 64 x 256 x 256 floats: ~8000 pages each
    with allocator.reuse_freed_memory():
        _faults_of_one_fusion(ct, mr)  # pages the working set in once
        with allocator.reuse_freed_memory():  # nesting keeps the setting
            assert _faults_of_one_fusion(ct, mr) < cold // 20
        assert _faults_of_one_fusion(ct, mr) < cold // 20
    assert _faults_of_one_fusion(ct, mr) > cold // 2  # released, and defaults back, after it
