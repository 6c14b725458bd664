"""The cpu backend: the torch backend with the noise drawn by a compiled kernel — the Philox
stream in one fused C++ loop (csrc/cpu/noise.cpp, shipped in the package as anadp/csrc; OpenMP threads
and SIMD lanes), compiled on first use with torch's C++ extension loader (ninja) and cached per
environment (``build_directory``).

Where it cannot be built (no compiler, no ninja) ``auto`` takes the torch backend, which draws
the same numbers ~25x slower, after one warning that says why; ``python -m anadp info`` shows it.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

from .. import philox, sources
from .. import update_table as U
from .torch_ref import TorchBackend

_FOLDER = os.path.join(sources.csrc_dir(), "cpu")
_SOURCES = [os.path.join(_FOLDER, f) for f in ("noise.cpp", "update.cpp", "gain.cpp", "bindings.cpp")]
# headers: part of the build's key (build_directory), not compiled on their own
_HEADERS = [os.path.join(_FOLDER, "gaussian.h"), os.path.join(os.path.dirname(_FOLDER), "philox.cuh"),
            os.path.join(os.path.dirname(_FOLDER), "update_math.h")]
# -fno-math-errno lets log / cos run in glibc's vector versions; no -ffast-math, which would
# reassociate the float roundings that define the stream (and flush denormals process-wide)
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_ext = None
import_error: str | None = None
_tried = False


def build_directory() -> str:
    """Where this environment's build of the kernel lives: ANADP_CACHE_DIR (default
    ~/.cache/anadp, or $XDG_CACHE_HOME/anadp), one folder per (environment, torch, source, flags),
    so that two environments do not rebuild over each other's build."""
    import hashlib
    root = os.environ.get("ANADP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "anadp")
    sources = b""
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            sources += f.read()
    key = hashlib.sha256(b"\0".join([
        sources, sys.prefix.encode(), sys.version.encode(), torch.__version__.encode(), torch.__file__.encode(),
        " ".join(_CFLAGS).encode()])).hexdigest()[:16]
    return os.path.join(root, "cpu-kernels", key)


def _load():
    global _ext, import_error, _tried
    if _tried:
        return _ext
    _tried = True
    if os.environ.get("ANADP_CPU_KERNEL", "1") == "0":
        import_error = "disabled by ANADP_CPU_KERNEL=0"
        return None
    try:
        missing = [path for path in _SOURCES + _HEADERS if not os.path.exists(path)]
        if missing:
            raise FileNotFoundError(f"its sources {missing} are not in the installed package")
        from torch.utils.cpp_extension import load
        _put_ninja_on_path()
        folder = build_directory()
        os.makedirs(folder, exist_ok=True)
        _remove_stale_lock(folder)
        if not os.path.exists(os.path.join(folder, "anadp_cpu.so")):
            print(f"anadp: compiling the CPU kernels (once per environment; 20 s to a few minutes) into {folder}",
                  file=sys.stderr, flush=True)
        ldflags = ["-fopenmp"] + (["-lmvec"] if _glibc() else [])
        _ext = load(name="anadp_cpu", sources=_SOURCES, extra_cflags=_CFLAGS, extra_ldflags=ldflags,
                    build_directory=folder, verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: fall back, and say why
        import_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
        warnings.warn(f"anadp: the CPU kernels could not be built ({import_error}); the noise is drawn with torch "
                      "ops instead (same numbers, ~25x slower), the allocation's maximizer runs in numpy")
        _ext = None
    return _ext


STALE_LOCK_S = 900  # a build takes 20 s to ~3 min on a busy 2-core machine


def _remove_stale_lock(folder: str) -> None:
    """torch's loader waits on the build folder's ``lock`` while another process builds; a build
    that was killed leaves it behind, and every later process would wait forever. A lock older
    than any build is such a leftover."""
    import time
    lock = os.path.join(folder, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
            warnings.warn(f"anadp: removed a stale build lock {lock} (a killed build's)")
    except FileNotFoundError:
        pass


def _put_ninja_on_path() -> None:
    """torch's loader runs `ninja` from PATH; the ninja package's binary is not on it where the
    environment is used without being activated (env/bin/python script.py)."""
    import shutil
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _glibc() -> bool:
    import platform
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def why_unavailable() -> str | None:
    """None when the compiled kernel loads (building it if needed), else the reason."""
    return None if _load() is not None else import_error


def available() -> bool:
    return _load() is not None


def add_gaussian_(out: torch.Tensor, key: int, std: float, offset0: int = 0) -> bool:
    """out += std * z with z the Philox stream of ``key`` from element ``offset0`` on, in place, if
    the kernel can do it (a contiguous float32 CPU tensor); returns whether it did."""
    ext = _load()
    if ext is None or out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        return False
    ext.add_gaussian_(out, key - 2**64 if key >= 2**63 else key, float(std), int(offset0))
    return True


def add_gaussian_multi_(outs: list, keys: list, stds: list) -> bool:
    """add_gaussian_ on every tensor of ``outs`` (each from element 0) in one call, if the kernel can
    take them all (contiguous float32 CPU tensors); returns whether it did."""
    ext = _load()
    if ext is None or not all(o.device.type == "cpu" and o.dtype == torch.float32 and o.is_contiguous() for o in outs):
        return False
    ext.add_gaussian_multi_(outs, [k - 2**64 if k >= 2**63 else k for k in keys], [float(s) for s in stds])
    return True


def philox_words(key: int, counters: torch.Tensor) -> torch.Tensor:
    """(4, n) int64: the four Philox words per counter, from the compiled kernel."""
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the CPU kernel is not available: {import_error}")
    return ext.philox_words(key - 2**64 if key >= 2**63 else key, counters.long().contiguous())


def group_keys(seed: int, step: int, groups: list) -> list:
    """anadp.philox.group_keys, by the compiled kernel where it loads (~200 keys a step: the Python
    Philox took ~2 ms of host time per BERT-base step)."""
    ext = _load()
    if ext is None or not (0 <= seed < 2**64 and 0 <= step < 2**64) or not all(0 <= g < 2**32 for g in groups):
        return philox.group_keys(seed, step, groups)  # also raises on out-of-range arguments
    signed = ext.group_keys(seed - 2**64 if seed >= 2**63 else seed, step - 2**64 if step >= 2**63 else step,
                            list(groups), philox._DOMAIN)
    return [k % 2**64 for k in signed]


def maximize_gain(log_x0, G2, G2_rest: float, alpha, d, n: float, adaptive: bool, lo: float, hi: float,
                  iterations: int):
    """anadp's step-gain maximizer compiled (AnadpAllocation._best_for_step's loop; float64 tensors),
    or None where the kernel is not available (the caller runs its numpy loop)."""
    ext = _load()
    if ext is None:
        return None
    return ext.maximize_gain(log_x0, G2, float(G2_rest), alpha, d, float(n), bool(adaptive), float(lo), float(hi),
                             int(iterations))


def multi_tensor_update(params: list, grads: list, ms: list, vs: list, keys: list[int], rows: torch.Tensor, *,
                        kind: int, has_noise: bool = True, tile: int | None = None, sens: torch.Tensor | None = None,
                        stat: str = "abs_p_grad", store_grad: bool = False,
                        moment_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As anadp.kernels.multi_tensor_update, one call on the CPU; a tile is a whole tensor (the
    per-tensor sums, in float64 over blocks of 1024, are what the caller adds up anyway).
    ``tile`` and ``sens`` (a preallocated per-tile buffer) do not apply: the per-tensor sums are returned.
    ``store_grad``: each grad is overwritten by the privatized gradient (the optimizer sets p.grad to it);
    ``moment_sq``: a (tensors,) float64 buffer that gets each tensor's sum of squares of its first moment
    after the update (what the allocation reads)."""
    code = U.stat_code(stat)
    if not params:
        empty = torch.zeros(0, dtype=torch.float32)
        return empty, empty.to(torch.int32)
    # the compiled function checks dtypes, sizes, contiguity and devices itself
    out = _load().multi_tensor_update(params, grads, ms, vs, [U.as_signed64(k) for k in keys],
                                      rows.to(dtype=torch.float32).contiguous(), kind, has_noise, code,
                                      store_grad)
    if moment_sq is not None:  # each tensor's sum of m^2 after the update (0 without a first moment)
        moment_sq.copy_(out[1])
    return out[0].float(), torch.arange(len(params), dtype=torch.int32)


class CpuBackend(TorchBackend):
    """The torch backend's norms; the noise and the optimizer update in compiled loops."""
    name = "cpu"
    fused_update = True
    stores_grad = True  # its fused update leaves the privatized gradient in p.grad, as the torch path
    warn_fallback = False  # other optimizers and dtypes take the torch path: the same numbers, slower

    def why_unavailable(self, device: torch.device | None) -> str | None:
        if device is not None and device.type != "cpu":
            return f"the CPU kernel runs on CPU tensors, the parameters are on {device}"
        return why_unavailable()

    def add_noise_(self, out: torch.Tensor, key: int, std: float) -> None:
        if not add_gaussian_(out, key, std):  # not a contiguous float32 tensor: the torch ops
            super().add_noise_(out, key, std)

    def add_noise_from_(self, out: torch.Tensor, key: int, std: float, start: int) -> None:
        if not add_gaussian_(out, key, std, start):
            super().add_noise_from_(out, key, std, start)

    def add_noise_multi_(self, outs: list, keys: list, stds: list) -> None:
        if not add_gaussian_multi_(outs, keys, stds):
            super().add_noise_multi_(outs, keys, stds)

    def multi_tensor_update(self, *args, **kw):
        return multi_tensor_update(*args, **kw)
