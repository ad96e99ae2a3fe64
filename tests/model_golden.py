"""The official DiT's numbers (tests/data/official_model_golden.pt, made by the official models.py
through tests/data/make_official_model_golden.py) and how a model is judged against them."""

import torch

from tests.data import make_official_model_golden as official
from tests.helpers import assert_rel_close

CONFIGS = official.CONFIGS
GOLDEN = torch.load(official.GOLDEN_PATH)


def expected(name):
    """Case `name`'s official results; forward_with_cfg as fastdit's contract has it: the official
    guidance on the eps channels [:min(3, in_channels)] and the rest unguided (the official [:3]
    also guides learned-sigma channels when in_channels < 3)."""
    exp = dict(GOLDEN["cases"][name])
    n = min(3, CONFIGS[name]["in_channels"])
    exp["forward_with_cfg"] = torch.cat([exp["forward_with_cfg"][:, :n], exp["cfg_raw"][:, n:]], dim=1)
    return exp


def assert_matches_official(make_model, name, rel):
    """make_model's case `name` against the official: the initial weights bit for bit (pos_embed within
    a float32 ulp: its float64 sin/cos may come from another libm), every output and gradient
    within `rel` of the largest official value."""
    got = official.run_case(make_model, name)
    exp = expected(name)
    assert sorted(got) == sorted(exp), f"{name}: keys {sorted(set(got) ^ set(exp))} differ from the official"
    for key, e in exp.items():
        g = got[key]
        if key == "init.pos_embed":
            torch.testing.assert_close(g, e, rtol=0, atol=torch.finfo(torch.float32).eps, msg=f"{name}[{key}]")
        elif key.startswith("init."):
            diff = (g - e).abs().max().item() if g.shape == e.shape else "shape"
            assert torch.equal(g, e), f"{name}[{key}] differs from the official initial weights (max diff {diff})"
        else:
            assert_rel_close(f"{name}[{key}]", g, e, rel)
