"""Applying an execution policy to a model from outside, without touching its definition.

A policy (memory-lean training in `train.lean`, fast inference in `infer.fast`) changes *how*
some modules compute, never *what*: it specialises a module in place by giving it a subclass of
its own class (the way `torch.nn.utils.parametrize` does). Parameters, buffers and state-dict keys
stay as they are, so checkpoints, optimizers, DDP and FSDP see the same model; `restore` puts the
plain class back.
"""
from __future__ import annotations

from torch import nn

_SUBCLASSES: dict[tuple[type, type], type] = {}


def specialise(module: nn.Module, mixin: type) -> nn.Module:
    """Make `module` an instance of `mixin` + its current plain class (idempotent). Returns it."""
    base = plain_class(module)
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{mixin.__name__}[{base.__name__}]", (mixin, base), {"_plain_class": base})
    module.__class__ = _SUBCLASSES[key]
    return module


def plain_class(module: nn.Module) -> type:
    return getattr(type(module), "_plain_class", type(module))


def restore(module: nn.Module) -> nn.Module:
    """Undo `specialise` on `module` and every submodule."""
    for sub in module.modules():
        sub.__class__ = plain_class(sub)
    return module
