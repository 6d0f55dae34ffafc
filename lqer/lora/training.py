"""Fine-tuning the LoRA adapters with optax, the quantized base frozen.

Linen: `split_adapters` separates the `{name}_lora_a|b` leaves from the rest;
`train_step` differentiates the loss with respect to the adapters only, so
the base gets no gradient by construction and stays quantized. NNX: the
same with Qwix's idiom, `nnx.LoRAParam` (`nnx.Optimizer(..., wrt=
nnx.LoRAParam)`, `nnx_train_step`).

A step whose loss or update is not finite (NaN or inf) changes nothing: the
adapters and optimizer state stay those from before it, and the step raises
`FloatingPointError` naming its number. Checking waits for the step's
result (one scalar read per step).

Memory: autodiff keeps what the backward pass reads, which for a quantized
matmul includes the weight dequantized in the forward pass. Running the
blocks under `lax.scan` with each block rematerialised (`jax.checkpoint`)
keeps one block's worth at a time; `lqer finetune` does so for SmolLM2
(`models.smollm2.scanned_hidden`). `remat_policy` checkpoints the whole
loss instead (on XLA:CPU this does not separate unrolled blocks).
"""

import functools
import math
from typing import Any, Callable

import flax
from flax import nnx
import jax
import jax.numpy as jnp
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


class TrainStep:
  """A Linen training step (see `train_step`): call it as
  step(adapters, opt_state, frozen, batch) -> (adapters, opt_state, loss).

  Attributes:
    calls: how many times the step was called, refused steps included; a
      non-finite step's error names its call (1 for the first).
  """

  def __init__(self, fn):
    self._fn = fn  # jitted, or compiled by `compile`
    self.calls = 0

  def __call__(self, adapters, opt_state, frozen, batch):
    self.calls += 1
    new_adapters, new_state, loss, update_finite = self._fn(
      adapters, opt_state, frozen, batch
    )
    if not _finite(loss, update_finite):
      raise _non_finite('lqer train_step', self.calls, loss)
    return new_adapters, new_state, loss

  def compile(self, adapters, opt_state, frozen, batch) -> 'TrainStep':
    """This step compiled ahead of time for these arguments' shapes (arrays
    or `jax.ShapeDtypeStruct`s); `memory_analysis()` then reports on it."""
    return TrainStep(
      self._fn.lower(adapters, opt_state, frozen, batch).compile()
    )

  def memory_analysis(self):
    """XLA's memory analysis of a step from `compile`."""
    if not hasattr(self._fn, 'memory_analysis'):
      raise TypeError(
        'TrainStep.memory_analysis: compile the step first'
        ' (step.compile(adapters, opt_state, frozen, batch))'
      )
    return self._fn.memory_analysis()


def train_step(
  loss_fn: Callable[[Any, Any], jax.Array],
  optimizer: optax.GradientTransformation,
  remat_policy=None,
) -> TrainStep:
  """A jitted Linen step (adapters, opt_state, frozen, batch) -> (adapters,
  opt_state, loss).

  loss_fn(params, batch) is the loss of the whole LoRA model (params: the
  merged tree, e.g. `lambda p, b: xent(model.apply({'params': p}, b))`).
  Only the adapters are differentiated and updated: g = dL/d(adapters),
  (u, s) = optimizer.update(g, s, adapters), adapters += u.

  A step whose loss, new adapters or new optimizer state is not finite
  raises `FloatingPointError` naming the step (`TrainStep.calls`); the
  adapters and optimizer state passed to it are left as they were, so
  training can go on from them (e.g. with another batch or a lower
  learning rate).
  """

  def step(adapters, opt_state, frozen, batch):
    loss_of = lambda a: loss_fn(merge_adapters(frozen, a), batch)
    if remat_policy is not None:
      loss_of = jax.checkpoint(loss_of, policy=remat_policy)
    loss, grads = jax.value_and_grad(loss_of)(adapters)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    adapters = optax.apply_updates(adapters, updates)
    return adapters, opt_state, loss, _all_finite((adapters, opt_state))

  # Nothing is donated. A donated argument's buffers are deleted by the
  # call, so a step refused for a non-finite update could not leave the
  # caller's adapters and optimizer state usable, and any tree sharing a
  # buffer with them (a caller's copy, or LQER params an older `to_lora`
  # aliased) would lose it too. Donation would save little: the adapters
  # (rank 32 on a 7B Llama: about 1 % of the float32 weights' bytes) and
  # AdamW's state (twice that), and a guarded step needs the old and the new
  # values at once anyway, until the flag says which to keep.
  return TrainStep(jax.jit(step))


def nnx_train_step(
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  loss_fn: Callable[[nnx.Module, Any], jax.Array],
  batch,
) -> jax.Array:
  """One NNX step over the `nnx.LoRAParam`s only (the optimizer built with
  `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`); returns the loss.
  loss_fn(model, batch) -> scalar.

  A step whose loss or update is not finite leaves the model's trained
  params and the optimizer's state (its `step` count included) as they were
  and raises `FloatingPointError` naming the step (`optimizer.step + 1`).
  """
  loss, update_finite = _nnx_step(model, optimizer, loss_fn, batch)
  if not _finite(loss, update_finite):
    # Not applied: the optimizer's count is that of the last step applied.
    raise _non_finite('lqer nnx_train_step', int(optimizer.step[...]) + 1, loss)
  return loss


@functools.partial(nnx.jit, static_argnames='loss_fn')
def _nnx_step(model, optimizer, loss_fn, batch):
  """nnx_train_step, jitted: (loss, whether the update is finite). Unless
  both are finite, the trained params and the optimizer state get back
  their values from before the step."""
  diff = nnx.DiffState(0, optimizer.wrt)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, batch)
  trained = lambda: nnx.as_pure(
    (nnx.state(model, optimizer.wrt), nnx.state(optimizer))
  )
  old = trained()
  optimizer.update(model, grads)
  new = trained()
  update_finite = _all_finite(new)
  keep = update_finite & jnp.isfinite(loss)
  model_state, opt_state = jax.tree.map(
    lambda n, o: jnp.where(keep, n, o), new, old
  )
  nnx.update(model, model_state)
  nnx.update(optimizer, opt_state)
  return loss, update_finite


def _all_finite(tree) -> jax.Array:
  """Whether every inexact leaf of `tree` is finite (a scalar bool)."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _finite(loss, update_finite) -> bool:
  """Whether a step's loss and update were finite (waits for the step)."""
  return bool(update_finite) and math.isfinite(float(loss))


def _non_finite(fn: str, step: int, loss) -> FloatingPointError:
  loss = float(loss)
  what = (
    f'its loss is {loss}'
    if not math.isfinite(loss)
    else 'its update is not finite (NaN or inf in the new adapters or'
    ' optimizer state)'
  )
  return FloatingPointError(
    f'{fn}: step {step}: {what}. The step was not applied: the adapters and'
    ' the optimizer state are those from before it. Check the batch and'
    ' the loss, or lower the learning rate.'
  )
