"""Turning user arrays into numpy or CuPy arrays, and results back into the caller's kind.

numpy arrays run on the reference backend.  CuPy arrays, objects with
``__cuda_array_interface__`` and torch CUDA tensors run on the GPU, zero-copy.  For torch
tensors the op runs on torch's current stream and returns torch tensors.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np



class LazyDtype:
    """A numpy dtype from a module imported on first use (``ml_dtypes`` alone takes ~0.7 s).

    It goes wherever numpy or CuPy take a dtype (``np.empty(n, BFLOAT16)``, ``x.astype(BFLOAT16)``,
    ``x.view(BFLOAT16)``, ``np.dtype(BFLOAT16)``: numpy reads a ``.dtype`` attribute), compares
    and hashes like the real dtype (``x.dtype == BFLOAT16``, ``x.dtype in FLOAT_DTYPES``) and
    answers its attributes (``.itemsize``, ``.name``).  Comparing it with a dtype imports the
    module; comparing a float32 array's dtype with ``FLOAT_DTYPES`` does not reach it.
    """

    __slots__ = ("_module", "_attr", "_dtype")

    def __init__(self, module: str, attr: str):
        self._module, self._attr, self._dtype = module, attr, None

    @property
    def dtype(self) -> np.dtype:
        if self._dtype is None:
            import importlib

            self._dtype = np.dtype(getattr(importlib.import_module(self._module), self._attr))
        return self._dtype

    def __getattr__(self, name):
        if name.startswith("_"):  # (copy / pickle probe these before __init__ ran)
            raise AttributeError(name)
        return getattr(self.dtype, name)

    def __eq__(self, other):
        try:
            return self.dtype == np.dtype(other)
        except TypeError:
            return NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self):
        return hash(self.dtype)

    def __repr__(self):
        return repr(self.dtype)

    def __str__(self):
        return str(self.dtype)


# ml_dtypes registers bfloat16 with numpy (a runtime dependency), imported on first use
BFLOAT16 = LazyDtype("ml_dtypes", "bfloat16")

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)

CUPY_INSTALL = "install ds4kern[cuda12] or ds4kern[cuda13] (CUDA 12 / 13) on a machine with an NVIDIA GPU"


def cupy_or_none():
    try:
        import cupy
    except Exception:
        return None
    return cupy


def require_cupy(what: str):
    """CuPy, or an ImportError saying that ``what`` needs it and how to install it."""
    try:
        import cupy
    except Exception as e:
        raise ImportError(f"{what} needs a CUDA GPU and CuPy, which is not importable ({type(e).__name__}: {e}); "
                          f"{CUPY_INSTALL}") from None
    return cupy


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "__dlpack__")


class Frame:
    """Where an op runs: backend, CuPy module, device and stream, and how to hand results back.

    Made from the op's main array; every other array argument is converted through
    :meth:`convert`, which checks it lives on the same backend and device.
    """

    def __init__(self, x: Any, name: str):
        self.torch = False
        self.torch_cpu = False
        self.cp = None
        self.device_id = None
        self.stream = None  # a cupy stream object for torch inputs, else None (current stream)
        if isinstance(x, np.ndarray):
            self.backend = "numpy"
            self.array = x
            return
        if _is_torch(x):
            if not x.is_cuda:
                self.backend = "numpy"
                self.torch_cpu = True
                self.array = x.detach().numpy() if x.dtype != _torch_bf16() else _torch_cpu_bf16(x)
                return
            cp = self._need_cupy(name, x)
            import torch

            self.torch = True
            self.device_id = x.device.index if x.device.index is not None else torch.cuda.current_device()
            with cp.cuda.Device(self.device_id):
                self.stream = _external_stream(cp, torch.cuda.current_stream(x.device))
                with self.stream:
                    self.array = cp.from_dlpack(x.detach())
            self.backend = "cuda"
            return
        cp = cupy_or_none()
        if cp is not None and isinstance(x, cp.ndarray):
            self.cp = cp
            self.backend = "cuda"
            self.array = x
            self.device_id = x.device.id
            return
        if hasattr(x, "__cuda_array_interface__"):
            cp = self._need_cupy(name, x)
            self.backend = "cuda"
            self.array = cp.asarray(x)
            self.device_id = self.array.device.id
            return
        raise TypeError(
            f"{name} must be a numpy array, a CuPy array, a torch CUDA tensor or an object with "
            f"__cuda_array_interface__; got {type(x).__module__}.{type(x).__name__}"
        )

    def _need_cupy(self, name, x):
        cp = cupy_or_none()
        if cp is None:
            raise TypeError(f"{name} is a GPU array ({type(x).__name__}) but CuPy is not installed; {CUPY_INSTALL}")
        self.cp = cp
        return cp

    # -- other arguments ------------------------------------------------------------------
    def convert(self, x: Any, name: str, written: bool = False):
        """Bring another array argument onto this frame's backend and device (zero-copy);
        ``written``: the op writes into it, so a read-only host array is refused."""
        if self.backend == "numpy":
            if isinstance(x, np.ndarray):
                return writable(x, name) if written else x
            if _is_torch(x) and not x.is_cuda:
                return x.detach().numpy()
            raise TypeError(
                f"{name} must be a numpy array like the other inputs (they are on the host); "
                f"got {type(x).__module__}.{type(x).__name__}"
            )
        cp = self.cp
        if type(x) is cp.ndarray:
            if x.device.id != self.device_id:
                raise ValueError(f"{name} is on device {x.device.id}, the other inputs on device {self.device_id}")
            return x
        if isinstance(x, np.ndarray):
            raise TypeError(
                f"{name} is a numpy (host) array but the other inputs are on the GPU; move it with "
                "cupy.asarray first"
            )
        if _is_torch(x):
            if not x.is_cuda:
                raise TypeError(f"{name} is a CPU torch tensor but the other inputs are on the GPU")
            with self.stream if self.stream is not None else contextlib.nullcontext():
                arr = cp.from_dlpack(x.detach())
        elif isinstance(x, cp.ndarray):
            arr = x
        elif hasattr(x, "__cuda_array_interface__"):
            arr = cp.asarray(x)
        else:
            raise TypeError(f"{name} must be a GPU array like the other inputs; got {type(x).__name__}")
        if arr.device.id != self.device_id:
            raise ValueError(f"{name} is on device {arr.device.id}, the other inputs on device {self.device_id}")
        return arr

    # -- execution ------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self):
        """Device and stream under which the chosen variant runs."""
        if self.backend == "numpy":
            yield
            return
        with self.cp.cuda.Device(self.device_id):
            if self.stream is not None:
                with self.stream:
                    yield
            else:
                yield

    def run(self, fn, *args):
        """``fn(*args)`` on this frame's device and stream (no context switch when already there)."""
        if self.backend == "numpy":
            return fn(*args)
        if self.stream is None and self.cp.cuda.runtime.getDevice() == self.device_id:
            return fn(*args)
        with self.running():
            return fn(*args)

    @property
    def xp(self):
        return np if self.backend == "numpy" else self.cp

    def empty(self, shape, dtype):
        if self.backend == "numpy":
            return np.empty(shape, dtype)
        with self.cp.cuda.Device(self.device_id):
            return self.cp.empty(shape, dtype)

    def give_back(self, arr):
        """Return a result in the kind of array the caller passed (torch in, torch out)."""
        if self.torch:
            import torch

            return torch.from_dlpack(arr)
        if self.torch_cpu:
            import torch

            if arr.dtype == BFLOAT16:
                return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
            return torch.from_numpy(arr)
        return arr


def to_host(a):
    """A host (numpy) array of ``a`` (CuPy arrays copied back, one synchronisation); None stays None."""
    if a is None or isinstance(a, np.ndarray):
        return a
    return a.get() if hasattr(a, "get") else np.asarray(a)


def data_ptr(a) -> int:
    """Address of an array's first element (numpy or CuPy)."""
    return int(a.ctypes.data) if isinstance(a, np.ndarray) else int(a.data.ptr)


def byte_span(a):
    """Byte range ``[lo, hi)`` an array touches (any strides), or None when it is None or empty."""
    if a is None or a.size == 0:
        return None
    lo = hi = data_ptr(a)
    for n, s in zip(a.shape, a.strides):
        if s < 0:
            lo += s * (n - 1)
        else:
            hi += s * (n - 1)
    return lo, hi + a.itemsize


def same_view(a, b) -> bool:
    """Whether two arrays are exactly the same view of the same memory."""
    return data_ptr(a) == data_ptr(b) and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype


def writable(a, name: str):
    """``a``, or a ValueError naming it if it is a read-only numpy array (the op writes into it)."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        raise ValueError(f"{name} is read-only (numpy flags.writeable is False) but the op writes into it; "
                         "pass a writable array")
    return a


def _external_stream(cp, torch_stream):
    """A CuPy stream object for a torch stream (no copy, no synchronisation)."""
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None:
        try:
            return from_external(torch_stream)
        except Exception:
            pass
    return cp.cuda.ExternalStream(torch_stream.cuda_stream)


def _torch_bf16():
    import torch

    return torch.bfloat16


def _torch_cpu_bf16(t):
    import torch

    return t.detach().contiguous().view(torch.uint16 if hasattr(torch, "uint16") else torch.int16).numpy().view(BFLOAT16)


_DTYPE_NAMES = {np.dtype(n): n for n in ("float32", "float16", "float64", "int8", "int16", "int32", "int64",
                                          "uint8", "uint16", "uint32", "uint64", "bool")}


def dtype_name(dt) -> str:
    """Short name of a dtype ("bfloat16" for ml_dtypes' bfloat16); a dict hit on the hot path."""
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = np.dtype(dt).name
        if isinstance(dt, np.dtype):  # (bfloat16 once it is in use)
            _DTYPE_NAMES[dt] = name
    return name


def rows_view(xp, arr, lead: tuple, k: int, name: str):
    """A ``[T, k]`` view of ``arr`` (shape ``lead + (k,)``) sharing its memory, or ValueError.

    Leading dims must collapse into one row axis without a copy; strides must be non-negative
    multiples of the item size.  Works for numpy and CuPy arrays.
    """
    shape, st, item = tuple(arr.shape), tuple(arr.strides), arr.itemsize
    want = tuple(lead) + (k,)
    if shape != want:
        raise ValueError(f"{name} must have shape {want}, got {shape}")
    if any(x < 0 or x % item for x in st):
        raise ValueError(f"{name} must have non-negative strides that are multiples of its item size, got {st}")
    T = 1
    for d in lead:
        T *= d
    if arr.ndim == 2:
        return arr
    dims = [(d, x) for d, x in zip(lead, st[:-1]) if d != 1]
    for (d0, x0), (d1, x1) in zip(dims, dims[1:]):
        if x0 != x1 * d1:
            raise ValueError(f"{name}: its leading dimensions cannot be merged into one row axis without a copy "
                             f"(shape {shape}, strides {st})")
    row = dims[-1][1] if dims else k * st[-1]
    return xp.lib.stride_tricks.as_strided(arr, (T, k), (row, st[-1]))
