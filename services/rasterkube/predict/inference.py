"""How a replica runs its model: precision (autocast), compilation, and the CUDA feed.

Precision
---------
``spec.precision`` bf16/fp16 runs the model under ``torch.autocast``: convolutions and matrix
products in the reduced type, the rest (and the output, and the softmax) in float32. fp16 is
a CUDA feature; a replica that finds itself on a CPU with fp16 (``device: auto`` and no GPU
visible) refuses to start rather than run something else than was asked for.

Compilation
-----------
``spec.compile`` wraps the model (with its ``transforms`` and the softmax) in ``torch.compile``
once per replica, and calls it once at start on a batch of zeros, so the first real batch does
not pay the compilation. Every batch has the warm-up's shape (a short last batch is padded with
zeros to ``maxBatchSize`` and the padding's outputs dropped): one shape, one compiled graph, no
recompilation mid-run. Inductor keeps what it compiled on disk (``TORCHINDUCTOR_CACHE_DIR``,
by default ``<rasterkube cache>/inductor``), so a later replica of the same model on the same
machine starts in seconds. Inductor writes C++ for CPUs (a C++ compiler must be installed) and
Triton kernels for GPUs (Triton builds its launcher with a C compiler): :func:`check_toolchain`
says so clearly instead of a traceback from inside Inductor. TorchScript models cannot be
compiled (torch.compile refuses them).

CUDA feed
---------
:class:`CudaFeed` moves a request's batches host → device through two pinned staging buffers
on a copy stream, so the next batch's copy runs while the current one computes; results come
back into pinned host memory with non-blocking copies, and the host waits once per request.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from rasterkube.api.kinds import Precision
from rasterkube.errors import UserError
from rasterkube.sampledata import cache_dir

if TYPE_CHECKING:
    import torch

CPU: Final = "cpu"
CUDA: Final = "cuda"
INDUCTOR_CACHE_ENV: Final = "TORCHINDUCTOR_CACHE_DIR"
INDUCTOR_CACHE_SUBDIR: Final = "inductor"
#: Staging buffers of the CUDA feed: one being copied while the other is computed on.
FEED_SLOTS: Final = 2
_AUTOCAST_DTYPES: Final = {Precision.BF16: "bfloat16", Precision.FP16: "float16"}
# Triton's launcher is built with $CC or the first of these (as Triton looks them up).
_C_COMPILERS: Final = ("cc", "gcc", "clang")


COMPILE_TORCHSCRIPT: Final = (
    "spec.compile: TorchScript models cannot be compiled (torch.compile refuses them); export the model with "
    "torch.export (a .pt2 archive) or set compile: false"
)


class PrecisionError(UserError):
    """The precision asked for cannot run on the device the replica got."""


class CompileError(UserError):
    """``spec.compile`` cannot work here (the model's format, or no compiler installed)."""


# ----------------------------------------------------------------------------- precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``; None for fp32 (no autocast)."""
    import torch

    name = _AUTOCAST_DTYPES.get(Precision(precision))
    return None if name is None else getattr(torch, name)


def check_precision(precision: str, device: str) -> None:
    """Refuse fp16 anywhere but CUDA (the replica's actual device, after ``auto``)."""
    if Precision(precision) == Precision.FP16 and device != CUDA:
        raise PrecisionError(
            f"spec.precision: fp16 runs on CUDA GPUs only, and this model replica runs on {device} (no GPU visible "
            "to it); use bf16 or fp32, or make sure the replicas get a GPU (serving.gpusPerReplica, resources.gpus)"
        )


def autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for reduced precision, nothing for fp32."""
    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device, dtype=dtype)


# ----------------------------------------------------------------------------- batches


def batch_slices(n: int, size: int) -> list[slice]:
    """Model batches of at most ``size`` patches covering ``n`` patches, in order."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` with zero patches appended up to ``size`` (compiled models see one batch shape)."""
    if len(x) >= size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), dtype=x.dtype)])


# ----------------------------------------------------------------------------- compile


def compiler_problem(device: str) -> str | None:
    """What is missing for torch.compile on ``device`` here, or None when nothing is."""
    if device == CUDA:
        # Triton compiles a small C launcher per kernel signature.
        wanted = [os.environ["CC"]] if os.environ.get("CC") else list(_C_COMPILERS)
        if any(shutil.which(cc) for cc in wanted):
            return None
        return f"no C compiler ({' or '.join(wanted)}) for Triton's kernel launchers"
    try:
        # Inductor's own search (config.cpp.cxx: $CXX or g++), so the check and the compile agree.
        from torch._inductor import cpp_builder, exc

        cpp_builder.get_cpp_compiler()
    except ImportError:
        cxx = os.environ.get("CXX", "g++")
        return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) for Inductor's CPU code"
    except exc.InvalidCxxCompiler:
        cxx = os.environ.get("CXX", "g++")
        return f"no C++ compiler ({cxx}, or $CXX) for Inductor's CPU code"
    return None


def check_toolchain(device: str, where: str) -> None:
    """Refuse ``spec.compile`` where the compiler Inductor needs is missing."""
    problem = compiler_problem(device)
    if problem is not None:
        raise CompileError(
            f"spec.compile: {where} has {problem}; install one in the image (e.g. apt-get install g++) or set "
            "compile: false"
        )


def use_inductor_cache() -> str:
    """Inductor's on-disk cache under rasterkube's cache (unless the user chose one)."""
    return os.environ.setdefault(INDUCTOR_CACHE_ENV, str(cache_dir() / INDUCTOR_CACHE_SUBDIR))


@functools.cache
def _served_class() -> type:
    import torch  # lazily: importing this module must not need torch

    class Served(torch.nn.Module):
        """transforms → model → float32 (→ softmax): what a batch goes through, as one module
        (one graph when compiled). The softmax runs on float32 even under autocast."""

        def __init__(self, model: Any, transforms: Any | None, softmax: bool) -> None:
            super().__init__()
            self.model, self.transforms, self.softmax = model, transforms, softmax

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.transforms is not None:
                x = self.transforms(x)
            y = self.model(x).float()
            return torch.softmax(y, dim=1) if self.softmax else y

    return Served


def served(model: Any, transforms: Any | None, softmax: bool) -> torch.nn.Module:
    """The module a replica calls (and compiles) for each model batch."""
    return _served_class()(model, transforms, softmax)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- CUDA feed


class CudaFeed:
    """Batches of one request host → GPU → host with copies overlapping compute.

    Per model batch ``i`` (slot ``i % 2``): the patches are copied into the slot's pinned
    host buffer and from there, on the copy stream, into the slot's device buffer (non-
    blocking); the compute stream waits for that copy, runs the model, and copies the result
    into a pinned output (non-blocking). Batch ``i + 1`` is staged right after batch ``i``'s
    compute is queued, so its copy runs during that compute. A slot is refilled only after the
    copy that last read its host buffer has finished (host wait on an event) and, on the GPU,
    after the compute that last read its device buffer (stream wait on an event). The host
    waits for the GPU once, at the end of the request.

    The CUDA calls are the small methods at the end (``_stream`` ... ``_device_empty``), so the
    schedule can be exercised without a GPU.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.copy_stream = self._stream()
        self.copied = [self._event() for _ in range(FEED_SLOTS)]  # host→device copy of the slot done
        self.consumed = [self._event() for _ in range(FEED_SLOTS)]  # compute that read the slot done
        self.host: list[Any] = []
        self.dev: list[Any] = []
        self.shape: tuple[int, ...] | None = None

    def _buffers(self, shape: tuple[int, ...]) -> None:
        if shape != self.shape:  # a new patch size or channel count: the previous run has finished
            self.host = [self._pinned(shape) for _ in range(FEED_SLOTS)]
            self.dev = [self._device_empty(shape) for _ in range(FEED_SLOTS)]
            self.shape = shape

    def _stage(self, batch: np.ndarray, sl: slice, slot: int, rows: int) -> None:
        """Patches of ``sl`` into the slot: host → pinned → device (``rows``: with padding)."""
        n = sl.stop - sl.start
        self.copied[slot].synchronize()  # the slot's last copy has read its pinned buffer
        host = self.host[slot]
        host[:n].numpy()[...] = batch[sl]  # the one host-side copy, into pinned memory
        if rows > n:
            host[n:rows].zero_()
        with self._on(self.copy_stream):
            self.copy_stream.wait_event(self.consumed[slot])  # the GPU is done reading the device buffer
            self.dev[slot][:rows].copy_(host[:rows], non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def run(self, batch: np.ndarray, size: int, pad: bool, forward: Callable[[Any], Any]) -> np.ndarray:
        """``forward`` over ``batch`` in model batches of ``size``; float32 numpy out.

        ``pad``: every model batch has ``size`` rows (zeros after the last patch)."""
        slices = batch_slices(len(batch), size)
        self._buffers((size, *batch.shape[1:]))
        compute = self._current_stream()
        rows = [size if pad else s.stop - s.start for s in slices]
        out = None
        self._stage(batch, slices[0], 0, rows[0])
        for i, sl in enumerate(slices):
            slot = i % FEED_SLOTS
            compute.wait_event(self.copied[slot])
            y = forward(self.dev[slot][: rows[i]])
            self.consumed[slot].record(compute)
            if i + 1 < len(slices):
                self._stage(batch, slices[i + 1], (i + 1) % FEED_SLOTS, rows[i + 1])  # overlaps batch i's compute
            if out is None:
                out = self._pinned((len(batch), *y.shape[1:]))
            out[sl].copy_(y[: sl.stop - sl.start], non_blocking=True)  # device → pinned host, after compute
        compute.synchronize()
        assert out is not None
        # A view of the pinned tensor, which the array keeps alive.
        return out.numpy()

    # The CUDA calls (overridden by the tests' CPU stand-in).
    def _stream(self) -> Any:
        import torch

        return torch.cuda.Stream(device=self.device)

    def _event(self) -> Any:
        import torch

        return torch.cuda.Event()

    def _current_stream(self) -> Any:
        import torch

        return torch.cuda.current_stream(self.device)

    def _on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        import torch

        return torch.cuda.stream(stream)

    def _pinned(self, shape: tuple[int, ...]) -> Any:
        import torch

        return torch.empty(shape, dtype=torch.float32, pin_memory=True)

    def _device_empty(self, shape: tuple[int, ...]) -> Any:
        import torch

        return torch.empty(shape, dtype=torch.float32, device=self.device)


def iter_cpu_batches(batch: np.ndarray, size: int, pad: bool) -> Iterator[tuple[slice, np.ndarray]]:
    """(slice, model input) per model batch on a CPU replica; padded to ``size`` if ``pad``."""
    for sl in batch_slices(len(batch), size):
        x = np.ascontiguousarray(batch[sl], dtype=np.float32)
        yield sl, pad_batch(x, size) if pad else x
