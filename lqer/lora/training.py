"""Fine-tuning the LoRA adapters with optax, the quantized base frozen.

Linen: `split_adapters` separates the `{name}_lora_a|b` leaves from the rest;
`train_step` differentiates the loss with respect to the adapters only, so
the base gets no gradient by construction and stays quantized. NNX: the
same with Qwix's idiom, `nnx.LoRAParam` (`nnx.Optimizer(..., wrt=
nnx.LoRAParam)`, `nnx_train_step`).

Memory: autodiff keeps what the backward pass reads, which for a quantized
matmul includes the weight dequantized in the forward pass. Running the
blocks under `lax.scan` with each block rematerialised (`jax.checkpoint`)
keeps one block's worth at a time; `lqer finetune` does so for SmolLM2
(`models.smollm2.scanned_hidden`). `remat_policy` checkpoints the whole
loss instead (on XLA:CPU this does not separate unrolled blocks).
"""

import functools
from typing import Any, Callable

import flax
from flax import nnx
import jax
import optax

from lqer.lora.adapters import is_adapter


def split_adapters(params) -> tuple[dict, dict]:
  """(adapters, frozen): the LoRA adapter leaves of a Linen params tree, and
  everything else. `merge_adapters` is the inverse."""
  flat = flax.traverse_util.flatten_dict(params)
  pick = lambda keep: flax.traverse_util.unflatten_dict(
    {p: v for p, v in flat.items() if is_adapter(p) == keep}
  )
  return pick(True), pick(False)


def merge_adapters(frozen, adapters) -> dict:
  """The full params tree from `split_adapters`' two halves."""
  flat = flax.traverse_util.flatten_dict(frozen)
  flat.update(flax.traverse_util.flatten_dict(adapters))
  return flax.traverse_util.unflatten_dict(flat)


def train_step(
  loss_fn: Callable[[Any, Any], jax.Array],
  optimizer: optax.GradientTransformation,
  remat_policy=None,
):
  """A jitted Linen step (adapters, opt_state, frozen, batch) -> (adapters,
  opt_state, loss).

  loss_fn(params, batch) is the loss of the whole LoRA model (params: the
  merged tree, e.g. `lambda p, b: xent(model.apply({'params': p}, b))`).
  Only the adapters are differentiated and updated: g = dL/d(adapters),
  (u, s) = optimizer.update(g, s, adapters), adapters += u.
  """

  def step(adapters, opt_state, frozen, batch):
    loss_of = lambda a: loss_fn(merge_adapters(frozen, a), batch)
    if remat_policy is not None:
      loss_of = jax.checkpoint(loss_of, policy=remat_policy)
    loss, grads = jax.value_and_grad(loss_of)(adapters)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


@functools.partial(nnx.jit, static_argnames='loss_fn')
def nnx_train_step(
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  loss_fn: Callable[[nnx.Module, Any], jax.Array],
  batch,
) -> jax.Array:
  """One NNX step over the `nnx.LoRAParam`s only (the optimizer built with
  `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`); returns the loss.
  loss_fn(model, batch) -> scalar."""
  diff = nnx.DiffState(0, nnx.LoRAParam)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, batch)
  optimizer.update(model, grads)
  return loss
