"""Builds the optional C++ CPU kernel (csrc/) as endokern._cpu_kernel with pybind11.

The kernel takes raw pointers, so it needs no PyTorch headers. If there is no compiler (or pybind11),
or ENDOKERN_NO_CPU_EXT=1 is set, installation still succeeds without it and backend="cpu" says why.
"""

import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
ext_modules = []
cmdclass = {}

if SOURCES and os.environ.get("ENDOKERN_NO_CPU_EXT", "0") in ("", "0"):
    try:
        from pybind11.setup_helpers import Pybind11Extension, build_ext
    except ImportError:
        print("endokern: pybind11 is not installed; building without the C++ CPU kernel", file=sys.stderr)
    else:
        openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
        ext_modules.append(
            Pybind11Extension(
                "endokern._cpu_kernel",
                SOURCES,
                include_dirs=["csrc"],
                cxx_std=17,
                extra_compile_args=["-O3", "-fno-math-errno", *openmp],
                extra_link_args=openmp,
            )
        )

        class OptionalBuildExt(build_ext):
            """A failed native build warns and leaves the pure-Python package working."""

            def build_extensions(self):
                self.failed = set()
                super().build_extensions()
                # later steps (in-place copy, editable wheels) must not look for what was not built
                self.extensions = [ext for ext in self.extensions if ext.name not in self.failed]

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # CompileError, LinkError, a missing compiler
                    self.failed.add(ext.name)
                    print(
                        f"endokern: WARNING: the C++ CPU kernel was not built ({exc}); "
                        "backend='cpu' will be unavailable",
                        file=sys.stderr,
                    )

        cmdclass["build_ext"] = OptionalBuildExt

setup(ext_modules=ext_modules, cmdclass=cmdclass)
