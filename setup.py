"""Builds kt_patch and its C++ kernel. Each ISA backend is compiled with its own flags; the rest of the extension
targets the baseline ISA, and the backend is chosen at run time (never -march=native)."""
import glob
import os
import platform
import shutil
import sys
import time

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

X86 = platform.machine().lower() in ("x86_64", "amd64")
BACKEND_FLAGS = {
    "csrc/backends/avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/backends/avx512_bf16.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                                      "-mfma", "-mavx2"],
    "csrc/backends/amx_bf16.cpp": ["-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl",
                                   "-mavx512dq", "-mavx512bf16", "-mfma", "-mavx2"],
} if X86 else {}


class BuildExt(build_ext):
    """Adds the per-file ISA flags of BACKEND_FLAGS when compiling those sources, and prints a line per file (the
    sources compile in parallel: ParallelCompile below)."""

    def build_extensions(self):
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = [flag for path, flags in BACKEND_FLAGS.items() if src.replace("\\", "/").endswith(path)
                     for flag in flags]
            started = time.monotonic()
            _progress(f"compiling {src}")
            compile_one(obj, src, ext, cc_args, list(extra_postargs) + extra, pp_opts)
            _progress(f"compiled {src} in {time.monotonic() - started:.0f} s")

        self.compiler._compile = _compile
        super().build_extensions()


def _progress(message: str) -> None:
    # stderr, flushed: pip shows a build's output with -v
    print(f"kt_patch build: {message}", file=sys.stderr, flush=True)


class BuildPy(build_py):
    """Puts kt_patch.pth in site-packages, where Python reads it at start-up: it activates kt_patch when KT_ENABLE is
    set and does nothing else.

    A regular wheel carries it at its top. An editable wheel installs nothing from the build folder (the package is
    read from the source tree), so there it goes into the wheel's ``.data/purelib``, which installers also put in
    site-packages; setuptools points ``install_data`` at that wheel's ``.data/data`` while it builds one.
    """

    def run(self):
        super().run()
        os.makedirs(os.path.dirname(self._pth_output()), exist_ok=True)
        shutil.copy(os.path.join("kt_patch", "kt_patch.pth"), self._pth_output())

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [self._pth_output()]

    def _pth_output(self):
        if not self.editable_mode:
            return os.path.join(self.build_lib, "kt_patch.pth")
        data = self.get_finalized_command("install").install_data
        return os.path.join(os.path.dirname(data), "purelib", "kt_patch.pth")


# One compiler process per core (NPY_NUM_BUILD_JOBS=N overrides, the variable numpy's builds read): every source,
# each ISA backend included, is an independent translation unit.
ParallelCompile("NPY_NUM_BUILD_JOBS").install()
sources = ["csrc/binding.cpp", "csrc/moe_layer.cpp", "csrc/thread_pool.cpp", "csrc/shared_weights.cpp", "csrc/backends/scalar.cpp",
           *BACKEND_FLAGS]
headers = sorted(glob.glob("csrc/**/*.h", recursive=True))  # a change to any rebuilds the extension
setup(
    ext_modules=[Pybind11Extension("kt_patch._C", sources, depends=headers, cxx_std=17,
                                   extra_compile_args=["-O3", "-fno-trapping-math", "-fno-math-errno"],
                                   define_macros=[("NDEBUG", "1")])],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
