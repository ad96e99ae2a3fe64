"""patchify: eager, torch.compile(reference) and fastdit Triton side by side, on DiT's latents
(4 channels); no third-party kernel does this op (eager is PyTorch's own permuted copy).

Bytes: fwd and bwd each read and write every element once (2 B C H W e, e = 2 for bf16);
fwd+bwd twice that. Rows and method: benchmarks/kernel_bench.py.
"""

import pytest

from benchmarks import kernel_bench as kb
from fastdit import ops, reference

SUITE = "patchify"
IMPLS = kb.implementations(ops.patchify, reference.patchify)


@pytest.mark.parametrize("shape, mode, impl", kb.layout_cases(IMPLS), ids=str)
def test_patchify(shape, mode, impl):
    kb.run_layout_case(SUITE, IMPLS, shape, mode, impl, channels=4, from_tokens=False)
