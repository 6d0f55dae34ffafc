"""Factors tuned to the model's output, end to end, after the closed form.

The closed forms are per-layer optima: QERA's A B minimises each weight's
own expected output error for its base. `tune_factors` then tunes every
weight's A and B together against the float model, on calibration batches
only, the quantized bases (and input scales) frozen:

    softmax (logits):  min_{A,B}  Σ_t KL(p_fp,t ‖ p_t) / positions
    mse (any output):  min_{A,B}  Σ ||f - f_fp||² / Σ ||f_fp||²

with Adam (optax; warm-up, then cosine decay), one jitted step per batch,
batches in a seeded order, and the tuned factors kept only where they lower
the objective over the batches.
Quantized factors (`LqerRule.factor_qtype`) are tuned in float behind a
straight-through estimator: every forward pass rounds A per column and B per
row on the grid they are stored on (absmax scale in `factor_dtype`,
`decompose.quantize_symmetric`'s levels), gradients pass the rounding
unchanged, and the tuned factors are stored rounded the same way, so the
objective after tuning is that of the stored factors. Float factors are kept
in float32 while tuning and stored in `factor_dtype`.
"""

from collections.abc import Mapping
import dataclasses
import math
import numbers
import time
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lqer import _qwix
from lqer.offline.report import report as make_report
from lqer.quant.bits import qtype_bits
from lqer.quant.weight import WithLqer

OUTPUTS = ('softmax', 'mse')


@dataclasses.dataclass
class TuneRecord:
  """What `tune_factors` did.

  Attributes:
    output: the objective, 'softmax' (KL divergence per position) or 'mse'
      (squared error over the float output's energy).
    steps: optimizer steps taken.
    lr: Adam's learning rate.
    seed: the seed of the batch order.
    objective_before, objective_after: the objective over all the batches,
      before tuning and with the tuned factors as stored.
    losses: each step's objective on its batch, before its update.
    seconds: wall time of the tuning (evaluations included).
    output_error: with `calibration`, {path: (before, after)} of each
      weight's relative output error on the calibration distribution
      (`lqer.report`'s output_error), and 'TOTAL' the report's
      size-weighted total; else None.
    kept: whether the tuned factors were returned; False when tuning
      raised the objective (objective_after > objective_before), and the
      input params were returned instead.
  """

  output: str
  steps: int
  lr: float
  seed: int
  objective_before: float
  objective_after: float
  losses: list[float]
  seconds: float
  output_error: dict[str, tuple[float, float]] | None = None
  kept: bool = True


def tune_factors(
  apply_fn: Callable[..., Any],
  fp_params: Any,
  params: Any,
  batches: Sequence[Any],
  *,
  steps: int,
  lr: float = 3e-4,
  output: str = 'softmax',
  seed: int = 0,
  fp_apply_fn: Callable[..., Any] | None = None,
  calibration: Any = None,
  progress: bool = False,
) -> tuple[Any, TuneRecord]:
  """Tunes every weight's A, B against the float model's output.

  Minimises, over the factors only (bases frozen), with Adam (the rate
  warmed up over the first eighth of the steps, then cosine-decayed),

      'softmax':  Σ_t KL(softmax(f_fp,t) ‖ softmax(f_t)) / positions
      'mse':      Σ ||f - f_fp||² / Σ ||f_fp||²

  f the quantized model's output (every leaf of it; for 'softmax' each
  leaf's last axis holds logits), f_fp the float model's, on the batches:
  step i takes one batch, in an order drawn from `seed` (each pass over
  the batches a new permutation). Quantized factors are rounded as stored
  in every forward pass (straight-through gradients) and stored rounded.

  Args:
    apply_fn: apply_fn(params, *batch) -> output of the quantized model,
      e.g. `lambda p, *b: model.apply({'params': p}, *b)` with `model` under
      `LqerProvider`. NNX: split the quantized model, `graphdef, state =
      nnx.split(model)`, pass `state` as params and `lambda s, *b:
      nnx.merge(graphdef, s)(*b)`, then `nnx.update(model, tuned)`.
    fp_params: the float model's params.
    params: the quantized params: a Linen tree from `lqer_quantize_params`,
      the state of a split NNX model, or the pure dict it returns for NNX
      (with an apply_fn that puts it in a model: `m = make_model();
      nnx.update(m, params); return m(*batch)`); every quantized weight
      with factors of rank > 0 is tuned.
    batches: a list of argument tuples (calibration data only).
    steps: optimizer steps (>= 0; 0 measures the objective only).
    lr: Adam's peak learning rate (per value: factors of other scales may
      need another).
    output: 'softmax' (logits) or 'mse' (e.g. embeddings).
    seed: the batch order's seed (the tuning is deterministic given it).
    fp_apply_fn: fp_apply_fn(fp_params, *batch) -> the float output
      (default: apply_fn; an `LqerProvider` model refuses float params, so
      pass the float module's apply then).
    calibration: the quant_stats tree; with it (Linen params: `lqer.report`
      takes no NNX state), the record holds each weight's output error
      before and after.
    progress: show a progress bar.

  Returns:
    (params with the tuned factors, `TuneRecord`). Everything but the
    factors (and their scales) is the same object as in `params`. Where
    tuning raised the objective over the batches, `params` itself (the
    record's `kept` is False).

  Raises:
    ValueError: bad steps / lr / output / batches, or no weight with
      factors. TypeError: an NNX module instead of its state.
    FloatingPointError: a step's loss is not finite (nothing is returned).
  """
  _check_args(steps, lr, output, batches)
  if isinstance(params, nnx.Module):
    raise TypeError(
      'tune_factors: params is an NNX module; split it: graphdef, state ='
      ' nnx.split(model); tune_factors(lambda s, *b: nnx.merge(graphdef,'
      ' s)(*b), fp_params, state, ...), then nnx.update(model, tuned)'
    )
  leaves, treedef = jax.tree.flatten(params, is_leaf=_is_weight)
  tuned = [
    i
    for i, w in enumerate(leaves)
    if _is_weight(w) and _field(w, 'a').shape[-1] > 0
  ]
  if not tuned:
    raise ValueError(
      'tune_factors: no weight of params carries factors (a WithLqer with'
      ' rank > 0); quantize with lqer_quantize_params and rules with a rank'
    )
  fp_apply = fp_apply_fn or apply_fn

  def assemble(leaves, factors, stored=False):
    new = list(leaves)
    for i, (a, b) in zip(tuned, factors):
      new[i] = _with_factors(leaves[i], a, b, stored)
    return jax.tree.unflatten(treedef, new)

  def divergence(factors, leaves, fp_params, batch):
    out = apply_fn(assemble(leaves, factors), *batch)
    ref = jax.lax.stop_gradient(fp_apply(fp_params, *batch))
    return _divergence(output, ref, out)

  def loss_fn(factors, leaves, fp_params, batch):
    d, n = divergence(factors, leaves, fp_params, batch)
    return d / n

  optimizer = optax.adam(_schedule(lr, steps))

  @jax.jit
  def step(factors, opt_state, leaves, fp_params, batch):
    loss, grads = jax.value_and_grad(loss_fn)(factors, leaves, fp_params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, factors)
    return optax.apply_updates(factors, updates), opt_state, loss

  evaluate = jax.jit(divergence)

  def objective(factors):
    total, norm = 0.0, 0.0
    for batch in batches:
      d, n = evaluate(factors, leaves, fp_params, tuple(batch))
      total, norm = total + float(d), norm + float(n)
    return total / max(norm, 1e-30)

  start = time.perf_counter()
  factors = [_float_factors(leaves[i]) for i in tuned]
  before = objective(factors)
  opt_state = optimizer.init(factors)
  order = _order(len(batches), steps, seed)
  losses = []
  bar = tqdm(range(steps), desc='tune factors', disable=not progress)
  for i in bar:
    factors, opt_state, loss = step(
      factors, opt_state, leaves, fp_params, tuple(batches[order[i]])
    )
    loss = float(loss)
    if not math.isfinite(loss):
      raise FloatingPointError(
        f'tune_factors: step {i + 1} of {steps} has a non-finite loss'
        f' ({loss}); lower lr (now {lr})'
      )
    losses.append(loss)
    bar.set_postfix(loss=f'{loss:.4g}')
  out = assemble(leaves, factors, stored=True)
  stored = jax.tree.flatten(out, is_leaf=_is_weight)[0]
  after = objective([_float_factors(stored[i]) for i in tuned])
  kept = after <= before
  record = TuneRecord(
    output=output,
    steps=steps,
    lr=float(lr),
    seed=seed,
    objective_before=before,
    objective_after=after,
    losses=losses,
    seconds=time.perf_counter() - start,
    kept=kept,
  )
  if not kept:
    out = params
  if calibration is not None and isinstance(leaves[tuned[0]], WithLqer):
    record.output_error = _output_errors(fp_params, params, out, calibration)
  return out, record


def output_divergence(
  apply_fn: Callable[..., Any],
  params: Any,
  fp_apply_fn: Callable[..., Any],
  fp_params: Any,
  batches: Sequence[Any],
  output: str = 'softmax',
) -> float:
  """`tune_factors`' objective of any params (factors or not) over batches:

      'softmax':  Σ_t KL(softmax(f_fp,t) ‖ softmax(f_t)) / positions
      'mse':      Σ ||f - f_fp||² / Σ ||f_fp||²

  f = apply_fn(params, *batch), f_fp = fp_apply_fn(fp_params, *batch);
  one jitted pass per batch.
  """
  if output not in OUTPUTS:
    raise ValueError(f'output_divergence: output={output!r}: use {OUTPUTS}')
  evaluate = jax.jit(
    lambda p, fp, batch: _divergence(
      output, fp_apply_fn(fp, *batch), apply_fn(p, *batch)
    )
  )
  total, norm = 0.0, 0.0
  for batch in batches:
    d, n = evaluate(params, fp_params, tuple(batch))
    total, norm = total + float(d), norm + float(n)
  return total / max(norm, 1e-30)


def _check_args(steps, lr, output, batches):
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
    raise ValueError(f'tune_factors: steps must be an int >= 0, got {steps!r}')
  if steps < 0:
    raise ValueError(f'tune_factors: steps must be >= 0, got {steps}')
  if (
    isinstance(lr, bool)
    or not isinstance(lr, numbers.Real)
    or not math.isfinite(lr)
    or not lr > 0
  ):
    raise ValueError(
      f'tune_factors: lr must be a finite number > 0, got {lr!r}'
    )
  if output not in OUTPUTS:
    raise ValueError(
      f"tune_factors: output={output!r}: use 'softmax' (the output is"
      " logits: KL divergence) or 'mse' (any output)"
    )
  if not len(batches):
    raise ValueError('tune_factors: no batches (give calibration batches)')


def _schedule(lr: float, steps: int):
  """Linear warm-up from lr / 10 to lr over the first eighth of the steps,
  then cosine decay to lr / 10: Adam's first steps move every value by
  about its rate whatever its gradient, which unsettles a deep model's
  output (measured on 3 blocks of SmolLM2: at a constant rate the
  objective rose for several steps before falling)."""
  return optax.warmup_cosine_decay_schedule(
    lr / 10, lr, max(1, steps // 8), max(steps, 2), lr / 10
  )


def _is_weight(x) -> bool:
  """A quantized weight with factors: a `WithLqer`, or its fields as a
  mapping (an `nnx.State` node of a split NNX model, or the pure dict
  `lqer_quantize_params` returns for NNX)."""
  return isinstance(x, WithLqer) or (
    isinstance(x, Mapping) and {'array', 'a', 'b'} <= set(x.keys())
  )


def _field(w, name):
  """A weight's field, unboxed (None where it has none)."""
  value = getattr(w, name) if isinstance(w, WithLqer) else w.get(name)
  return None if value is None else _qwix.unbox(value)


def _replaced(w, **values):
  """w with fields replaced by values, each in its old box (Linen
  metadata, an NNX Variable)."""
  boxed = {
    k: _qwix.update_boxed(
      getattr(w, k) if isinstance(w, WithLqer) else w[k], value=v
    )
    for k, v in values.items()
  }
  if isinstance(w, WithLqer):
    return w.replace(**boxed)
  return type(w)({**w, **boxed})


def _float_factors(w):
  """(A, B) in float32, in the stored axes (dequantized if quantized)."""
  a, b = _field(w, 'a'), _field(w, 'b')
  a_scale, b_scale = _field(w, 'a_scale'), _field(w, 'b_scale')
  if a_scale is None:
    return a.astype(jnp.float32), b.astype(jnp.float32)
  return (
    a.astype(jnp.float32) * a_scale.astype(jnp.float32),
    b.astype(jnp.float32) * b_scale.astype(jnp.float32),
  )


def _with_factors(w, a, b, stored: bool):
  """w with float factors a, b: cast to the factors' dtype, or rounded on
  their grid (straight-through; integers and scales when `stored`)."""
  old_a, old_b = _field(w, 'a'), _field(w, 'b')
  sa, sb = _field(w, 'a_scale'), _field(w, 'b_scale')
  if sa is None:
    return _replaced(w, a=a.astype(old_a.dtype), b=b.astype(old_b.dtype))
  bits = qtype_bits(old_a.dtype)
  qa, a_scale = _fake_quantize(a, bits, sa.shape, sa.dtype)
  qb, b_scale = _fake_quantize(b, bits, sb.shape, sb.dtype)
  if stored:
    qa, qb = qa.astype(old_a.dtype), qb.astype(old_b.dtype)
  return _replaced(w, a=qa, b=qb, a_scale=a_scale, b_scale=b_scale)


def _fake_quantize(m, bits, scale_shape, scale_dtype):
  """(q, s): m ~= q s, one absmax scale per slice (reduced over the axes
  where `scale_shape` is 1), s rounded to scale_dtype, q = clip(round(m /
  s), ±(2^(b-1) - 1)) in float32 with the straight-through gradient
  dq/dm = 1 / s (so d(q s)/dm = 1); q's value is exactly the integer."""
  qmax = 2 ** (bits - 1) - 1
  axes = tuple(i for i, n in enumerate(scale_shape) if n == 1)
  amax = jax.lax.stop_gradient(jnp.max(jnp.abs(m), axis=axes, keepdims=True))
  scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(scale_dtype)
  x = m / scale.astype(jnp.float32)
  q = jnp.clip(jnp.round(x), -qmax, qmax)
  return q + (x - jax.lax.stop_gradient(x)), scale


def _divergence(output, ref, out):
  """(summed divergence, normaliser) of one batch: KL(p_fp ‖ p) summed
  over positions and their count ('softmax'), or ||f - f_fp||² and
  ||f_fp||² ('mse')."""
  pairs = [
    (f.astype(jnp.float32), g.astype(jnp.float32))
    for f, g in zip(jax.tree.leaves(ref), jax.tree.leaves(out))
  ]
  if output == 'softmax':
    kl = sum(
      jnp.sum(
        jax.nn.softmax(f) * (jax.nn.log_softmax(f) - jax.nn.log_softmax(g))
      )
      for f, g in pairs
    )
    return kl, float(sum(f.size // f.shape[-1] for f, _ in pairs))
  return (
    sum(jnp.sum(jnp.square(g - f)) for f, g in pairs),
    sum(jnp.sum(jnp.square(f)) for f, _ in pairs),
  )


def _order(n: int, steps: int, seed: int) -> list[int]:
  """Batch indices for `steps` steps: a new permutation of range(n) from
  `seed` for every pass over the batches."""
  rng = np.random.default_rng(seed)
  passes = -(-steps // n) if steps else 0
  return [int(i) for _ in range(passes) for i in rng.permutation(n)][:steps]


def _output_errors(fp_params, before, after, calibration) -> dict:
  """{path: (before, after)} of `lqer.report`'s output_error, and 'TOTAL'."""
  rep_before = make_report(fp_params, before, calibration)
  rep_after = make_report(fp_params, after, calibration)
  errors = {
    b.path: (b.output_error, a.output_error)
    for b, a in zip(rep_before.layers, rep_after.layers)
  }
  errors['TOTAL'] = (
    rep_before.total()['output_error'],
    rep_after.total()['output_error'],
  )
  return errors
