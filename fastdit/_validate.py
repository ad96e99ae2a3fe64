"""Argument checks shared across fastdit (ops, diffusion, models): each error names the argument."""


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
