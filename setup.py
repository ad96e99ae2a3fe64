"""fastdit: fast, drop-in Diffusion Transformer training and sampling.

Install offline on a machine that already has torch:  pip install --no-build-isolation -e ".[test]"
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "fastdit" / "__init__.py").read_text()).group(1)

setup(
    name="fastdit",
    version=VERSION,
    description="Fused-kernel Diffusion Transformer (DiT) training and sampling, drop-in for facebookresearch/DiT",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["fastdit", "fastdit.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        # The fused kernels; on other platforms fastdit runs its pure-PyTorch reference ops.
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors",
        "tqdm",
        "pillow",
        "matplotlib",  # loss curves, sample grids, benchmark plots
        "scikit-learn",  # the embedded default dataset (handwritten digits): nothing to download
    ],
    extras_require={
        # diffusers: the tests drive the real AutoencoderKL path (a tiny one with random weights). torch-fidelity
        # (fastdit fid) is installed by .ci/run with --no-deps: its dependencies would pull a torchvision, and
        # with it another torch, that fastdit does not use.
        "test": ["pytest>=7", "pytest-benchmark", "pytest-timeout", "diffusers==0.42.1"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "diffusers": ["diffusers==0.42.1"],  # the SD-VAE (fastdit latents, decoding); hub downloads via huggingface-hub
    },
    entry_points={"console_scripts": ["fastdit=fastdit.cli:main"]},
)
