"""PyTorch native state dict <-> the Flax model's parameters, in one place.

The Flax modules carry the PyTorch names (`layers.1.blocks.0.attn.qkv`), so a parameter's path
maps to its state-dict key by joining with dots; only the leaves differ:

    nnx.Linear  kernel [in, out]          <-> weight [out, in]           (transposed)
    nnx.Conv    kernel [kh, kw, in, out]  <-> weight [out, in, kh, kw]
    nnx.LayerNorm scale                   <-> weight
    v2 CPB MLP  cpb_mlp.layers.0 / .2     <-> cpb_mlp.0 / .2             (nnx.Sequential's list)

Everything else (biases, position tables, logit_scale, q/v biases, the absolute position embedding)
has the same name and shape.
Values are copied exactly (float32 stays float32), so native -> JAX -> native is bit-exact.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from ..weights.io import CheckpointError

_PRETRAINING_KEYS = ("mask_token",)  # SimMIM state a classifier does not hold


def torch_key(path: tuple) -> str:
    """The state-dict key of the parameter at an nnx `path`."""
    *modules, leaf = (str(part) for part in path)
    key = ".".join(modules + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])
    return key.replace("cpb_mlp.layers.", "cpb_mlp.")


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """A Flax parameter's value in the PyTorch layout."""
    if leaf == "kernel":
        return array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)
    return array


def from_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """A PyTorch tensor's value in the Flax parameter's layout."""
    if leaf == "kernel":
        return array.T if array.ndim == 2 else array.transpose(2, 3, 1, 0)
    return array


def _numpy(value) -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16: widen exactly, narrowed again in JAX
            return value.float().numpy().astype(jnp.bfloat16)
        return value.numpy()
    return np.asarray(value)


def parameter_paths(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    """(path, variable) of every parameter of `model`, in a fixed order."""
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, torch.Tensor | np.ndarray],
                    source: str = "the state dict") -> None:
    """Copy a native PyTorch state dict into `model`'s parameters (keeping each parameter's dtype).
    Any missing, unexpected or mis-shaped key raises one `CheckpointError` listing them all."""
    label = getattr(model, "name", None) or "the JAX model"
    nnx.update(model, from_torch_state(nnx.state(model, nnx.Param), state_dict, source, label))


def state_dict(model: nnx.Module) -> dict[str, torch.Tensor]:
    """`model`'s parameters as a native PyTorch state dict (CPU tensors, the parameters' dtypes)."""
    return to_torch_state(nnx.state(model, nnx.Param))


def to_torch_state(params: nnx.State) -> dict[str, torch.Tensor]:
    """A parameter-shaped state (the parameters, or Adam's moments of them) -> native-named CPU tensors."""
    out = {}
    for path, variable in nnx.to_flat_state(params):
        array = np.array(to_torch_layout(np.asarray(variable[...]), str(path[-1])), order="C")  # a copy
        if array.dtype == jnp.bfloat16:  # exact through float32: torch cannot take numpy's bfloat16
            out[torch_key(path)] = torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
        else:
            out[torch_key(path)] = torch.from_numpy(array)
    return out


def from_torch_state(template: nnx.State, state_dict: Mapping[str, torch.Tensor | np.ndarray],
                     source: str = "the state dict", label: str = "the JAX model") -> nnx.State:
    """Native-named tensors -> a state shaped like `template` (each leaf keeps the template's dtype).
    Any missing, unexpected or mis-shaped key raises one `CheckpointError` listing them all."""
    state_dict = {k: v for k, v in state_dict.items() if k not in _PRETRAINING_KEYS}
    flat = list(nnx.to_flat_state(template))
    wanted = {torch_key(path): (path, variable) for path, variable in flat}

    def torch_shape(path, variable):
        return list(to_torch_layout(np.empty(variable.shape), str(path[-1])).shape)

    problems = [f"  missing {key} {torch_shape(*entry)}" for key, entry in wanted.items() if key not in state_dict]
    problems += [f"  unexpected {key} {list(state_dict[key].shape)}" for key in state_dict if key not in wanted]
    values = []
    for key, (path, variable) in wanted.items():
        if key not in state_dict:
            continue
        value = from_torch_layout(_numpy(state_dict[key]), str(path[-1]))
        if value.shape != variable.shape:
            problems.append(f"  shape mismatch {key}: checkpoint {list(state_dict[key].shape)}, model "
                            f"{torch_shape(path, variable)}")
            continue
        values.append((path, variable.replace(jnp.asarray(value, dtype=variable.dtype))))
    if problems:
        raise CheckpointError("\n".join([f"{source} does not fit {label}:", *problems]))
    return nnx.from_flat_state(values)
