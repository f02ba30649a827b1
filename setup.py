"""Build script: the pure-Python package plus the compiled extension ``egp_fast._C``.

``kernels/`` (the Triton sources, at the top of the repository) is installed only as the
subpackage ``egp_fast.kernels``: ``egp_fast/kernels`` is a symbolic link to it, so editable
installs and wheels both see it inside the package. ``kernels/`` has no ``__init__.py``, so
from the repository root it never wins over Hugging Face's installed ``kernels`` package.

The extension (``csrc/``) is built with pybind11 through ``torch.utils.cpp_extension``:

* C++ kernels (CPU, OpenMP through ``at::parallel_for``) always;
* the CUDA kernels (``csrc/cuda_kernels.cu``) when torch is a CUDA build and a CUDA toolkit is
  found. No GPU is needed to compile them: ``CUDA_HOME`` is resolved here (a wrapper ``nvcc``
  script is followed to the real toolkit), and ``TORCH_CUDA_ARCH_LIST`` defaults to
  ``8.0;9.0`` when no GPU is visible. Values the user set are never overridden.
* ``EGP_FAST_BUILD_EXT=0`` (or ``EGP_FAST_NO_EXT=1``) builds pure Python;
  ``EGP_FAST_BUILD_CUDA=0`` skips only the CUDA sources.

A failing compile of requested code fails the build loudly; ``import egp_fast`` still works
wherever ``_C`` is absent (see ``egp_fast/_ext.py``).

    pip install --no-build-isolation -e .
"""

from __future__ import annotations

import glob
import os
import re
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# egp_fast.kernels has no __init__.py (see above), so find_packages does not list it.
PACKAGES = find_packages(include=["egp_fast", "egp_fast.*"]) + ["egp_fast.kernels"]
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _want_ext() -> bool:
    return _flag("EGP_FAST_BUILD_EXT", "1") and not _flag("EGP_FAST_NO_EXT", "0")


def _toolkit_root(nvcc: str) -> str | None:
    """The toolkit root behind an ``nvcc`` path, following symlinks and ``exec`` wrappers."""
    seen = set()
    path = nvcc
    while path and path not in seen:
        seen.add(path)
        real = os.path.realpath(path)
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
        except OSError:
            return None
        if head.startswith(b"#!"):
            # A wrapper script: follow the nvcc it runs (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`).
            found = re.findall(rb"(/[^\s'\"]*/bin/nvcc)\b", head)
            path = found[0].decode() if found else None
            continue
        root = os.path.dirname(os.path.dirname(real))
        return root if os.path.isdir(os.path.join(root, "include")) else None
    return None


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root(nvcc)
        if root:
            return root
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.realpath(root)
    return None


def _extensions():
    if not _want_ext():
        print("egp_fast: EGP_FAST_BUILD_EXT=0 / EGP_FAST_NO_EXT=1, building pure Python")
        return [], {}
    import torch

    cuda_home = _find_cuda_home() if (torch.version.cuda and _flag("EGP_FAST_BUILD_CUDA", "1")) else None
    with_cuda = cuda_home is not None
    if with_cuda:
        # cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ.setdefault("CUDA_HOME", cuda_home)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [
        "csrc/registration.cpp",
        "csrc/select/select_cpu.cpp",
        "csrc/sign_count/sign_count_cpu.cpp",
        "csrc/masks/zero_pruned_cpu.cpp",
    ]
    cxx = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]
    if with_cuda:
        print(
            f"egp_fast: building CPU + CUDA kernels (CUDA_HOME={os.environ['CUDA_HOME']}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})"
        )
        ext = CUDAExtension(
            name="egp_fast._C",
            sources=sources + ["csrc/cuda_kernels.cu"],
            define_macros=[("EGP_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        print("egp_fast: building CPU kernels only (no CUDA toolkit or CPU-only torch)")
        ext = CppExtension(
            name="egp_fast._C",
            sources=sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
