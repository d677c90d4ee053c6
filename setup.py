"""Builds the extension diffeqlayers._C; all metadata lives in pyproject.toml.

Every csrc/**/*.cpp goes in (the core folders and csrc/bindings), so adding a file never edits
this script. torch is not a build requirement: it must be the installed one, hence

    pip install --no-build-isolation .

Compiler flags (C++ standard, libstdc++ ABI) come from torch.utils.cpp_extension. Compilation
goes through ninja with MAX_JOBS workers (default: the number of CPUs) and through ccache when it
is installed. DIFFEQLAYERS_DEBUG=1 keeps debug info (-g -O0) instead of -O3 -g0.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch  # noqa: F401
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - only without torch
    sys.exit(
        "diffeqlayers builds against the installed torch: install torch first, then run "
        "`pip install --no-build-isolation .` (scripts/setup.sh does both)."
    )


def _use_ccache() -> None:
    """Route the compiler through ccache, keyed independently of the checkout's location."""
    if os.environ.get("DIFFEQLAYERS_NO_CCACHE") or shutil.which("ccache") is None:
        return
    # Same cache entries for every clone (CI builds in a fresh folder) and whatever the cwd.
    os.environ.setdefault("CCACHE_BASEDIR", ROOT)
    os.environ.setdefault("CCACHE_NOHASHDIR", "1")
    if hasattr(cpp_extension, "_wrap_compiler"):
        return  # torch >= 2.13 prepends ccache itself (unless TORCH_NO_COMPILER_WRAPPER is set)
    # Older torch: Debian's masquerade links (/usr/lib/ccache/g++ -> ccache) keep the compiler's
    # name, so torch's compiler/ABI check still sees g++.
    for var, name in (("CXX", "g++"), ("CC", "gcc")):
        wrapped = os.path.join("/usr/lib/ccache", name)
        if var not in os.environ and os.path.exists(wrapped):
            os.environ[var] = wrapped


def _headers() -> list:
    # Listed as `depends`: shipped in an sdist, and a changed header triggers a rebuild.
    return sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))


def _sources() -> list:
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        sys.exit("setup.py: no csrc/**/*.cpp found; run it from the repository root")
    return sources


_use_ccache()
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

if os.environ.get("DIFFEQLAYERS_DEBUG") == "1":
    cxx_flags = ["-g", "-O0"]
else:
    # -g0 overrides Python's default -g: a much smaller .so and a faster link.
    cxx_flags = ["-O3", "-g0"]

setup(
    ext_modules=[
        cpp_extension.CppExtension(
            name="diffeqlayers._C",
            sources=_sources(),
            depends=_headers(),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    # Keep setuptools' objects apart from the CMake tree in build/; persisting them lets ninja
    # skip unchanged files when the package is reinstalled.
    options={"build": {"build_base": os.path.join("build", "python")}},
)
