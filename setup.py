"""setuptools entry point; metadata lives in pyproject.toml.

This file exists for the optional CUDA extension (csrc/ -> anadp._cuda). It is
built where CUDA is usable (torch with CUDA importable at build time, nvcc found,
a GPU visible) or when ANADP_BUILD_CUDA=1 (then a failure is an error);
ANADP_BUILD_CUDA=0 never builds it. pip's build isolation hides the installed
torch, so build it with: ANADP_BUILD_CUDA=1 pip install --no-build-isolation -e .
Everywhere else `pip install .` installs the pure-Python package and
`python -m anadp info` says why the cuda backend is unavailable.
"""
import glob
import os
import sys

from setuptools import setup


def cuda_extension():
    """([extension], cmdclass) to build, or ([], {}) with the reason printed."""
    want = os.environ.get("ANADP_BUILD_CUDA", "")
    if want == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        reason = f"torch is not importable at build time ({e}; pip's build isolation? use --no-build-isolation)"
    else:
        if CUDA_HOME is None:
            reason = "no CUDA toolkit found (nvcc / CUDA_HOME)"
        elif torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif want != "1" and not torch.cuda.is_available():
            reason = "no CUDA device visible (ANADP_BUILD_CUDA=1 builds anyway)"
        else:
            here = os.path.dirname(os.path.abspath(__file__))
            sources = sorted(glob.glob(os.path.join(here, "csrc", "*.cu"))) + [
                os.path.join(here, "csrc", "bindings.cpp")]
            # the visible GPU's architecture only (half the build time); sm_80 and sm_90 where none is visible
            archs = ["%d%d" % torch.cuda.get_device_capability()] if torch.cuda.is_available() else ["80", "90"]
            ext = CUDAExtension("anadp._cuda", [os.path.relpath(s, here) for s in sources],
                                extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                                    "nvcc": ["-O3", "-std=c++17"] + [
                                                        f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]})
            return [ext], {"build_ext": BuildExtension}
    if want == "1":
        sys.exit(f"ANADP_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"anadp: not building the CUDA extension: {reason}", file=sys.stderr)
    return [], {}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
