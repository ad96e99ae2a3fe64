"""unpatchify: eager, torch.compile(reference) and fastdit Triton side by side, on DiT's final-layer
output (8 channels: learned sigma); no third-party kernel does this op.

Bytes: fwd and bwd each read and write every element once (2 B C H W e, e = 2 for bf16);
fwd+bwd twice that. Rows and method: benchmarks/kernel_bench.py.
"""

import pytest

from benchmarks import kernel_bench as kb
from fastdit import ops, reference

SUITE = "unpatchify"
IMPLS = kb.implementations(ops.unpatchify, reference.unpatchify)


@pytest.mark.parametrize("shape, mode, impl", kb.layout_cases(IMPLS), ids=str)
def test_unpatchify(shape, mode, impl):
    kb.run_layout_case(SUITE, IMPLS, shape, mode, impl, channels=8, from_tokens=True)
