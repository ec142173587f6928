"""Inference: ``fuse()`` over numpy arrays with the shipped, checksum-verified weights.

Precision paths (``precision=``):

* ``"fp32"``: plain contiguous float32, the reference;
* ``"channels_last"``: float32 in NHWC memory layout; on CPU with oneDNN's fused
  convolution + ReLU operators (:mod:`fusion_engine.onednn`), same result up to rounding;
* ``"bf16"``: bfloat16 weights and activations in NHWC, fused operators on CPU. Only where
  the hardware computes bf16 natively (CPUs with AVX512 or AMX, CUDA devices with bf16);
  elsewhere bf16 is emulated and slower than float32, so the request falls back to
  ``channels_last`` float32 with a logged warning: the exact result, never a slow one;
* ``"auto"`` (default): ``channels_last`` on CPU, ``fp32`` on CUDA.

Every path is deterministic for a given machine and thread count; the tests check that the fast
paths stay within 45 dB PSNR of the fp32 output.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import torch

from fusion_engine import onednn
from fusion_engine.allocator import reuse_freed_memory
from fusion_engine.defaults import DEFAULT_BATCH_SIZE, DEFAULT_STRATEGY
from fusion_engine.errors import InputError, WeightsError
from fusion_engine.model import STRATEGY_NAMES, FusionNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Directory of the shipped weights, their ``manifest.json`` and ``MODEL_CARD.md``."""

MODEL_NAME = "res2net-fusion"
MODEL_RELEASE = "2.0"

STRATEGIES: tuple[str, ...] = STRATEGY_NAMES
"""Strategy names accepted by :func:`fuse` (the first is the default)."""

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "channels_last", "bf16")

TILE_HALO = 16
"""Margin of each tile in pixels: >= the receptive radius of the network (13 3x3
convolutions on the longest path with the learned fusion layer, 12 plus 1 for the l1-norm
block average with the hand-made rules)."""

DEFAULT_CPU_TILE: int | None = None
"""Tile size on CPU (None: one pass). Tiling is exact but was slower on the 2-core
development machine (benchmarks/fusion_speed.py), so it is off; it bounds memory on huge
images."""


def _manifest(weights_dir: Path) -> dict[str, object]:
    path = weights_dir / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise WeightsError(f"weights manifest missing: {path}") from exc
    except (OSError, ValueError) as exc:
        raise WeightsError(f"weights manifest unreadable: {path}: {exc}") from exc
    if not isinstance(data, dict) or "file" not in data or "sha256" not in data:
        raise WeightsError(f"weights manifest {path} lacks 'file' or 'sha256'")
    return data


def model_version(weights_dir: Path = WEIGHTS_DIR) -> str:
    """``"res2net-fusion 1.0 (sha256 1234abcd)"``, from the manifest (no torch needed)."""
    try:
        sha = str(_manifest(weights_dir)["sha256"])[:8]
    except WeightsError:
        sha = "missing"
    return f"{MODEL_NAME} {MODEL_RELEASE} (sha256 {sha})"


MODEL_VERSION: str = model_version()
"""Model name, release and the first 8 hex digits of the weights' sha256."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(weights_dir: Path = WEIGHTS_DIR) -> dict[str, torch.Tensor]:
    """Load the weights after checking their sha256 against the manifest.

    Raises :class:`WeightsError` when the file is missing, altered or not loadable.
    """
    manifest = _manifest(weights_dir)
    path = weights_dir / str(manifest["file"])
    if not path.is_file():
        raise WeightsError(f"weights file missing: {path}")
    digest = sha256_file(path)
    if digest != manifest["sha256"]:
        raise WeightsError(
            f"weights checksum mismatch for {path}: sha256 {digest}, expected {manifest['sha256']}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted pickle / zip
        raise WeightsError(f"cannot load weights {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} does not hold a state dict")
    return state


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> 'cuda' when available else 'cpu'; validates explicit names."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map 'auto' to the fastest accurate path of the device; validate the name."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    if precision == "auto":
        return "channels_last" if device.type == "cpu" else "fp32"
    if precision == "bf16" and not bf16_native(device):
        fallback = "channels_last" if device.type == "cpu" else "fp32"
        log.warning(
            "precision 'bf16' requested but %s has no native bf16 arithmetic; using %r "
            "(float32) instead",
            device,
            fallback,
        )
        return fallback
    return precision


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 convolutions natively (else bf16 is not offered)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and onednn.bf16_supported()


@dataclass(frozen=True)
class LoadedModel:
    """A network on a device in a precision, ready for :meth:`run`."""

    net: FusionNet
    device: torch.device
    precision: str

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype of this precision."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def memory_format(self) -> torch.memory_format:
        """NHWC for the fast paths, NCHW for the reference."""
        return torch.contiguous_format if self.precision == "fp32" else torch.channels_last

    @property
    def fused_ops(self) -> bool:
        """Whether :meth:`run` uses oneDNN's fused operators (CPU fast paths)."""
        return self.device.type == "cpu" and self.precision != "fp32" and onednn.available()

    def run(
        self, ct: torch.Tensor, mr: torch.Tensor, strategy: str, tile: int | None = None
    ) -> torch.Tensor:
        """Fuse (N, 1, H, W) float32 tensors with ``strategy`` on the model's device; float32
        result clamped to [0, 1].

        With ``tile`` the image is processed in tile x tile blocks, each with a
        :data:`TILE_HALO` pixel margin of real neighbours (or the image border), which gives
        the same result as one pass (the network's receptive radius is 13 pixels at most)
        while the activations stay in cache.
        """
        h, w = ct.shape[-2:]
        if tile is None or (h <= tile and w <= tile):
            return self._run(ct, mr, strategy)
        out = torch.empty(ct.shape, dtype=torch.float32)
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                y1, x1 = min(h, y0 + tile), min(w, x0 + tile)
                ya, xa = max(0, y0 - TILE_HALO), max(0, x0 - TILE_HALO)
                yb, xb = min(h, y1 + TILE_HALO), min(w, x1 + TILE_HALO)
                res = self._run(ct[..., ya:yb, xa:xb], mr[..., ya:yb, xa:xb], strategy)
                out[..., y0:y1, x0:x1] = res[..., y0 - ya : y1 - ya, x0 - xa : x1 - xa].cpu()
        return out

    def _run(self, ct: torch.Tensor, mr: torch.Tensor, strategy: str) -> torch.Tensor:
        a = ct.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        b = mr.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        fusion, reconstructor = self.net.path(strategy)
        fused = onednn.fuse if self.fused_ops else FusionNet.fuse
        out = fused(self.net, a, b, fusion, reconstructor)
        return out.float().clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=8)
def load_model(
    device: str = "cpu", precision: str = "fp32", weights_dir: Path = WEIGHTS_DIR
) -> LoadedModel:
    """The shipped network on ``device`` in ``precision`` (cached; the weights are immutable)."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    net = FusionNet()
    try:
        net.load_state_dict(load_state_dict(weights_dir))
    except RuntimeError as exc:
        raise WeightsError(f"weights do not fit the network: {exc}") from exc
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    model = LoadedModel(net, dev, prec)
    net.to(device=dev, dtype=model.dtype)
    net.to(memory_format=model.memory_format)  # type: ignore[call-overload]
    return model


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if threads < 1:
        raise InputError("threads must be >= 1")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _as_stack(name: str, arr: npt.ArrayLike) -> npt.NDArray[np.float32]:
    a = np.asarray(arr)
    if a.ndim not in (2, 3):
        raise InputError(f"{name} must have shape (H, W) or (N, H, W), got {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise InputError(f"{name} must be a real numeric array, got {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if a.ndim == 2:
        a = a[None]
    if a.shape[1] < 2 or a.shape[2] < 2:
        raise InputError(f"{name} slices must be at least 2 x 2, got {a.shape[1:]}")
    if a.size and not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or infinite values")
    if a.size and (a.min() < -1e-3 or a.max() > 1.0 + 1e-3):
        raise InputError(f"{name} values must lie in [0, 1], got [{a.min()}, {a.max()}]")
    clipped: npt.NDArray[np.float32] = np.clip(a, 0.0, 1.0)
    return clipped


def fuse(
    ct: npt.ArrayLike,
    mr: npt.ArrayLike,
    *,
    strategy: str = DEFAULT_STRATEGY,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    precision: str = "auto",
    tile: int | None = None,
) -> npt.NDArray[np.float32]:
    """Fuse CT and MR images of shape (H, W) or (N, H, W) with values in [0, 1].

    Returns float32 in [0, 1] of the input shape. ``strategy`` is one of :data:`STRATEGIES`;
    ``device`` is ``"auto"``, ``"cpu"`` or ``"cuda[:i]"``; slices are processed
    ``batch_size`` at a time; ``threads`` temporarily sets torch's CPU thread count;
    ``precision`` see the module docstring; ``tile`` the tile size of the (exact) tiled pass,
    ``None`` for :data:`DEFAULT_CPU_TILE` on CPU and untiled on CUDA, 0 for untiled.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if batch_size < 1:
        raise InputError("batch_size must be >= 1")
    if tile is not None and tile != 0 and tile < 2 * TILE_HALO:
        raise InputError(f"tile must be 0 (off) or >= {2 * TILE_HALO}")
    ct_np, mr_np = np.asarray(ct), np.asarray(mr)
    if ct_np.shape != mr_np.shape:
        raise InputError(f"CT shape {ct_np.shape} differs from MR shape {mr_np.shape}")
    squeeze = ct_np.ndim == 2
    a, b = _as_stack("ct", ct_np), _as_stack("mr", mr_np)
    model = load_model(str(resolve_device(device)), precision)
    if tile is None:
        tile_px = DEFAULT_CPU_TILE if model.device.type == "cpu" else None
    else:
        tile_px = tile or None
    out: npt.NDArray[np.float32] = np.empty_like(a)
    with _threads(threads), torch.inference_mode(), reuse_freed_memory():
        for start in range(0, a.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            ta = torch.from_numpy(np.ascontiguousarray(a[sl]))[:, None]
            tb = torch.from_numpy(np.ascontiguousarray(b[sl]))[:, None]
            out[sl] = model.run(ta, tb, strategy, tile_px)[:, 0].cpu().numpy()
    return cast("npt.NDArray[np.float32]", out[0] if squeeze else out)
