"""The jit-compiled training and evaluation steps, and the policies applied to a model from outside.

    model = swinkit.jax.create_model(name, drop_path_rate=0.1)
    apply_precision(model, "bf16-mixed")          # Linear/Conv compute in bf16, weights stay fp32
    apply_remat(model, "nothing_saveable")        # recompute every block in backward
    tx = build_optimizer(model, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8)
    state = init_train_state(model, tx)
    train_step = make_train_step(model, tx, label_smoothing=0.1, clip_grad=5.0)
    state, metrics = train_step(state, images, labels, lr)        # images [B, H, W, C]
    counts = make_eval_step(model)(state.params, state.rest, images, labels, valid)

The step is the PyTorch trainer's optimizer step (`train/trainer.py`): cross-entropy with label
smoothing (or soft targets from mixup), gradients averaged over `accumulation_steps` micro-batches,
the global norm clipped as `torch.nn.utils.clip_grad_norm_` does, the step skipped when that norm
is not finite, then AdamW (`train/optim.py`: the same weight-decay exemptions, layer-wise lr decay,
and the lr from `WarmupCosineSchedule.lr_at`, passed in per step so the schedule has one owner).

Data parallel: put the state on `replicated(mesh)` and the batch on `batch_sharding(mesh)` (a 1-D
mesh over devices, `make_mesh`); XLA inserts the gradient all-reduce. The same step runs on one
device or many.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..train.optim import decays, layer_id
from .convert import torch_key
from .model import SwinTransformer

PRECISIONS = ("fp32", "bf16-mixed")  # what the JAX trainer runs (fp16 would need loss scaling)
MIXED_DTYPES = {"bf16-mixed": jnp.bfloat16, "bf16": jnp.bfloat16}


# ------------------------------------------------------------------------ policies applied from outside
def apply_precision(model: SwinTransformer, precision: str | None) -> SwinTransformer:
    """Mixed precision as autocast does it: every Linear and Conv computes in bf16 while parameters,
    norms, the residual stream, attention softmax and the loss stay fp32. "fp32" changes nothing."""
    if precision in (None, "fp32", "float32"):
        model.set_attributes(nnx.Linear, nnx.Conv, dtype=None)
        return model
    if precision not in MIXED_DTYPES:
        raise ValueError(f"precision {precision!r} is not one the JAX backend runs ({', '.join(PRECISIONS)})")
    model.set_attributes(nnx.Linear, nnx.Conv, dtype=MIXED_DTYPES[precision])
    return model


def apply_remat(model: SwinTransformer, policy: str | None = "nothing_saveable") -> SwinTransformer:
    """Rematerialise every block in backward under `jax.checkpoint_policies.<policy>` ("nothing_saveable":
    keep only block inputs; "dots_saveable": keep matmul outputs ...); None switches it off."""
    if policy is not None and not callable(getattr(jax.checkpoint_policies, policy, None)):
        raise ValueError(f"unknown remat policy {policy!r}; see jax.checkpoint_policies (e.g. nothing_saveable)")
    for stage in model.layers:
        stage.remat_policy = policy
    return model


# ------------------------------------------------------------------------------------------ optimizer
def _by_name(params: nnx.State, fn: Callable[[str, jax.Array], object]) -> nnx.State:
    """`fn(native name, value)` for every parameter, in the structure of `params`."""
    def leaf(path, value):
        return fn(torch_key(tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))), value)
    return jax.tree_util.tree_map_with_path(leaf, params)


def weight_decay_mask(model: SwinTransformer) -> nnx.State:
    """True for the parameters AdamW decays (`train.optim.decays`, with the model's exempt keywords)."""
    keywords = tuple(model.no_weight_decay_keywords())
    return _by_name(nnx.state(model, nnx.Param), lambda name, value: decays(name, value.ndim, keywords))


def lr_scales(model: SwinTransformer, layer_decay: float | None) -> nnx.State | None:
    """Each parameter's lr multiplier under layer-wise lr decay (`train.optim.layer_id`), or None."""
    if layer_decay is None:
        return None
    depths = model.config.depths
    top = sum(depths) + 1
    return _by_name(nnx.state(model, nnx.Param),
                    lambda name, value: jnp.float32(layer_decay ** (top - layer_id(name, depths))))


def build_optimizer(model: SwinTransformer, *, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8
                    ) -> optax.GradientTransformation:
    """AdamW without its lr: Adam moments, then decoupled weight decay on the decayed parameters.
    The step multiplies by -lr (and the layer's scale): the same update as torch.optim.AdamW."""
    return optax.chain(optax.scale_by_adam(b1=betas[0], b2=betas[1], eps=eps),
                       optax.add_decayed_weights(weight_decay, mask=weight_decay_mask(model)))


@struct.dataclass
class TrainState:
    """Everything a step changes: parameters, the dropout / drop-path random streams, optimizer state."""

    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState


def init_train_state(model: SwinTransformer, tx: optax.GradientTransformation) -> TrainState:
    """A fresh `TrainState` from `model`'s current weights and random streams. The state owns copies
    (a donating step would otherwise delete the model's arrays)."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    return TrainState(params, rest, tx.init(params))


def update_model(model: SwinTransformer, state: TrainState) -> SwinTransformer:
    """Write a state's parameters and random streams back into `model` (to save or evaluate it)."""
    nnx.update(model, state.params, state.rest)
    return model


# -------------------------------------------------------------------------------------------- steps
def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy in fp32: integer labels `[B]` (with label smoothing, as torch's
    `F.cross_entropy`) or soft targets `[B, K]` (mixup / cutmix, smoothing included)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if targets.ndim == 1:
        classes = logits.shape[-1]
        targets = jax.nn.one_hot(targets, classes) * (1.0 - label_smoothing) + label_smoothing / classes
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


def make_train_step(model: SwinTransformer, tx: optax.GradientTransformation, *, label_smoothing: float = 0.0,
                    clip_grad: float | None = None, lr_scale: nnx.State | None = None,
                    accumulation_steps: int = 1, donate: bool = True):
    """A jitted `step(state, images, targets, lr) -> (state, metrics)`.

    images `[B, H, W, C]` (or `[accumulation_steps, B, H, W, C]`), targets `[B]` int labels or `[B, K]`
    soft targets (with the same leading axis); lr a scalar. metrics: "loss" (mean over micro-batches),
    "grad_norm" (before clipping) and "stepped" (False: non-finite gradients, nothing changed).
    `donate` lets XLA reuse the old state's buffers (do not touch `state` after the call).
    The step runs `model`'s structure in train mode (dropout and drop path on), whatever its mode now.
    """
    graphdef = nnx.graphdef(nnx.view(model, deterministic=False))

    def loss_and_grads(params, rest, images, targets):
        def loss_fn(params, rest):
            net = nnx.merge(graphdef, params, rest, copy=True)  # fresh variables: the streams advance here
            loss = cross_entropy(net(images), targets, label_smoothing)
            return loss, nnx.state(net, nnx.Not(nnx.Param))  # the random streams advanced
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        return loss, rest, grads

    def step(state: TrainState, images, targets, lr):
        if accumulation_steps == 1:
            loss, rest, grads = loss_and_grads(state.params, state.rest, images, targets)
        else:
            def micro(carry, batch):
                rest, loss_sum, grad_sum = carry
                loss, rest, grads = loss_and_grads(state.params, rest, *batch)
                return (rest, loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (rest, loss, grads), _ = jax.lax.scan(micro, (state.rest, jnp.float32(0), zeros), (images, targets))
            loss, grads = loss / accumulation_steps, jax.tree.map(lambda g: g / accumulation_steps, grads)
        grad_norm = optax.tree.norm(grads)
        if clip_grad:  # torch.nn.utils.clip_grad_norm_'s rule, epsilon included
            scale = jnp.minimum(1.0, clip_grad / (grad_norm + 1e-6))
            grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if lr_scale is None:
            updates = jax.tree.map(lambda u: -lr * u, updates)
        else:
            updates = jax.tree.map(lambda u, s: -lr * s * u, updates, lr_scale)
        params = optax.apply_updates(state.params, updates)
        stepped = jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(stepped, n, o), new, old)  # noqa: E731
        new = TrainState(keep(params, state.params), rest, keep(opt_state, state.opt_state))
        return new, {"loss": loss, "grad_norm": grad_norm, "stepped": stepped}

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(model: SwinTransformer, topk: int = 5):
    """A jitted `eval_step(params, rest, images, labels, valid) -> counts` running `model`'s structure in
    eval mode: sums over the batch of "loss_sum" (cross-entropy), "correct_top1", "correct_top5"
    (top-min(k, classes)) and "images", counting only rows where `valid` (not a short batch's padding)."""
    graphdef = nnx.graphdef(nnx.view(model, deterministic=True))

    def eval_step(params, rest, images, labels, valid):
        logits = nnx.merge(graphdef, params, rest)(images).astype(jnp.float32)
        losses = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
        hits = jax.lax.top_k(logits, min(topk, logits.shape[-1]))[1] == labels[:, None]
        valid = valid.astype(jnp.float32)
        return {"loss_sum": jnp.sum(losses * valid), "correct_top1": jnp.sum(hits[:, 0] * valid),
                "correct_top5": jnp.sum(jnp.any(hits, axis=-1) * valid), "images": jnp.sum(valid)}

    return jax.jit(eval_step)


# --------------------------------------------------------------------------------------- data parallel
def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: all)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(devices, ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Split the batch axis (after `leading_axes` axes, e.g. 1 for accumulation) across the mesh."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), "data"))
