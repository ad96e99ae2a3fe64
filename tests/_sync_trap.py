"""A trap for host synchronisation that works on the CPU.

On a GPU every read of a tensor's values by the host (`.item()`, `float(t)`, `if t:`, `.tolist()`,
`.cpu()`, `.numpy()`) and every op whose output size depends on values (`nonzero`, boolean-mask
indexing, `unique`, ...) waits for the device. On the CPU nothing waits, so such a read would go
unnoticed: inside `SyncTrap()` every one of them is recorded, wherever it comes from (Python code
through the torch-function layer, C++ through the dispatcher), with the line that caused it.
Host data made into a tensor (`torch.tensor([...])`, `torch.as_tensor(array)`) is recorded too: on a GPU
it is a copy from pageable memory, which torch follows with a stream synchronisation. (`.to(device)` is
not flagged: on the CPU a move to the CPU cannot be told from one that stays put; nor is
`torch.from_numpy`, which the torch-function layer does not see.)
"""

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that hand values to the host or size their output by the values.
SYNCING_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
    "is_nonzero",
    "allclose",
}
# Tensor methods that read values into Python (on the CPU some never reach the dispatcher).
READING_METHODS = {"tolist", "item", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__complex__"}
# Factories that copy host data (lists, numbers, arrays) into a new tensor.
FROM_HOST = {"tensor", "as_tensor", "asarray"}


def _where():
    frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename or "optim" in f.filename]
    return "".join(traceback.format_list(frames[-3:]))


class _Functions(TorchFunctionMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in READING_METHODS:
            self.events.append((f"Tensor.{name}", _where()))
        elif name in FROM_HOST and args and not isinstance(args[0], torch.Tensor):
            self.events.append((f"torch.{name} of host data", _where()))
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        # Boolean-mask indexing runs nonzero inside the index kernel, out of this mode's sight.
        masked = name.startswith("index") and any(getattr(i, "dtype", None) == torch.bool for i in _flat(args))
        if name in SYNCING_OPS or masked:
            self.events.append((str(func), _where()))
        return func(*args, **(kwargs or {}))


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


class SyncTrap:
    """with SyncTrap() as trap: ...  then trap.events: [(what, where)]; trap.check() raises if any."""

    def __init__(self):
        self.events = []
        self._modes = [_Functions(self.events), _Ops(self.events)]

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def check(self):
        if self.events:
            raise AssertionError(
                f"{len(self.events)} host synchronisation(s):\n" + "\n".join(f"{w}\n{loc}" for w, loc in self.events)
            )


@pytest.fixture
def checks_as_on_a_gpu(monkeypatch):
    """DiT.forward and training_losses read label and timestep values to check them only on CPU tensors,
    where that costs no sync (on a GPU they do not read them): here, where everything is on the CPU,
    let them decide as on a GPU."""
    from fastdit import _validate

    monkeypatch.setattr(_validate, "can_read_values", lambda t: False)
