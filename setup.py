"""fastdit's build step beyond pyproject.toml: the native CUDA kernels.

With nvcc and cmake found, the install also builds the native CUDA kernels (kernels/, CMake) into
fastdit/_native/; FASTDIT_BUILD_NATIVE=1 makes that mandatory, =0 skips it (kernels/build.py).
"""

import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.dist import Distribution

HERE = Path(__file__).parent


def _native_build():
    """kernels/build.py's functions (it sits outside the package)."""
    return SimpleNamespace(**runpy.run_path(str(HERE / "kernels" / "build.py")))


class build_native(Command):
    """Build the native CUDA kernels with CMake into the package's _native/ folder, or say why not."""

    description = "build fastdit's native CUDA kernels (kernels/) with CMake"
    user_options = []
    editable_mode = False  # set by `pip install -e`: build into the source tree

    def initialize_options(self):
        self.build_lib = self.build_temp = None

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"), ("build_temp", "build_temp"))

    def run(self):
        native = _native_build()
        tools, why = native.decide()  # raises when FASTDIT_BUILD_NATIVE=1 cannot be honoured
        if tools is None:
            print(
                f"fastdit: not building the native CUDA kernels ({why}); the cuda backend will be unavailable",
                file=sys.stderr,
            )
            return
        out = native.PACKAGE_DIR if self.editable_mode else Path(self.build_lib) / "fastdit" / "_native"
        print(f"fastdit: building the native CUDA kernels with {tools[0]}", file=sys.stderr)
        try:
            native.build(out, Path(self.build_temp) / "native", *tools)
        except native.BuildError as e:
            if os.environ.get(native.ENV, "").strip() == "1":
                raise
            print(
                f"fastdit: {e}\nfastdit: installing without the native CUDA kernels (FASTDIT_BUILD_NATIVE=1 makes this an error)",
                file=sys.stderr,
            )

    def get_outputs(self):
        return []

    def get_output_mapping(self):
        return {}


class BuildWithNative(build):
    sub_commands = build.sub_commands + [("build_native", None)]


class BinaryDistribution(Distribution):
    """The wheel may carry the native library: tag it for the platform."""

    def has_ext_modules(self):
        return True


# Metadata, dependencies and entry points live in pyproject.toml; this file adds the native build step.
setup(cmdclass={"build": BuildWithNative, "build_native": build_native}, distclass=BinaryDistribution)
