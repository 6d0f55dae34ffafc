"""Qwix QLoRA adapters from the reconstruction, and back.

Qwix's `LoraProvider` computes y = x deq(Wq) + (x a) b * alpha / rank over a
frozen quantized base; an LQER weight computes y = x deq(Wq) + (x A) B. So
the LQER factors are a QLoRA adapter pair that starts from the quantization
error instead of from zero:

    to_lora:   a = A,  b = B * rank / alpha      (same base Wq)
    from_lora: A = a,  B = b * alpha / rank

Qwix lays adapters out per op: for dot_general (Dense, DenseGeneral)
a: (*batch, in, rank), b: (*batch, rank, out) with the contracting and
output axes flattened; for einsum a keeps the kernel's contracting axes and
b its output axes. lqer stores A: (*batch, *contracting, rank),
B: (*batch, rank, *output), so both are reshapes (kernel axes in order). The
target layout is read from the LoRA model's abstract params, as
`lqer_quantize_params` reads its abstract tree.
"""

import dataclasses
import math
import numbers
from typing import Any, Sequence

import flax
from flax import nnx
from flax.linen import meta as nn_meta
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lqer import _qwix
from lqer.core.paths import path_str
from lqer.quant.packing import PackedInt4
from lqer.quant.rule import LqerRule
from lqer.quant.rule import match_rule
from lqer.quant.weight import WithLqer

ADAPTER_SUFFIXES = ('_lora_a', '_lora_b')
_QWIX_RULE_FIELDS = tuple(
  f.name for f in dataclasses.fields(qwix.QuantizationRule)
)


def lora_rules(
  rules: Sequence[qwix.QuantizationRule], alpha: float, **lora_kw
) -> list[qwix.QuantizationRule]:
  """Qwix LoRA rules matching LQER rules.

  Args:
    rules: `LqerRule`s (or plain Qwix rules).
    alpha: LoRA alpha (the adapters are scaled by alpha / rank).
    **lora_kw: more `qwix.LoraRule` fields (dropout, initializers).

  Returns:
    `qwix.LoraRule`s that quantize as `rules` do, with adapters of each
    rule's rank; a rule without a rank stays a plain Qwix rule (no adapter).
  """
  alpha = _check_alpha(alpha)
  out = []
  for rule in rules:
    common = {f: getattr(rule, f) for f in _QWIX_RULE_FIELDS}
    rank = getattr(rule, 'rank', None)
    if isinstance(rule, LqerRule) and rank is not None:
      rank = _check_lora_rank(rule, rank)
    if isinstance(rule, LqerRule) and rank:
      out.append(qwix.LoraRule(**common, rank=rank, alpha=alpha, **lora_kw))
    else:
      out.append(qwix.QuantizationRule(**common))
  return out


def _check_alpha(alpha) -> float:
  """alpha as a float: a finite number > 0 (NumPy scalars too)."""
  if isinstance(alpha, bool | np.bool_) or not isinstance(alpha, numbers.Real):
    raise TypeError(
      f'lqer.lora_rules: alpha must be a number (a finite float > 0, e.g.'
      f' the rank), got {type(alpha).__name__} {alpha!r}'
    )
  if not (math.isfinite(alpha) and alpha > 0):
    raise ValueError(
      'lqer.lora_rules: alpha must be a finite number > 0 (the adapters'
      f' are scaled by alpha / rank; e.g. alpha = rank), got {alpha!r}'
    )
  return float(alpha)


def _check_lora_rank(rule, rank) -> int:
  """A rule's rank as one Qwix LoRA rank: an int >= 0 (0: no adapter)."""
  if rank == 'auto':
    raise ValueError(
      f'lqer.lora_rules: LqerRule(module_path={rule.module_path!r}).rank:'
      " 'auto' gives each weight its own rank, but a Qwix LoraRule has"
      ' one; give the rules fixed ranks (an int > 0) for QLoRA.'
    )
  if isinstance(rank, bool | np.bool_) or not isinstance(
    rank, numbers.Integral
  ):
    raise TypeError(
      f'lqer.lora_rules: LqerRule(module_path={rule.module_path!r}).rank:'
      f' must be an int > 0 or None, got {rank!r}'
    )
  if rank < 0:
    raise ValueError(
      f'lqer.lora_rules: LqerRule(module_path={rule.module_path!r}).rank:'
      f' must be an int > 0 or None, got {rank}'
    )
  return int(rank)


def is_adapter(path) -> bool:
  """Whether a param path names a Qwix LoRA adapter ('{name}_lora_a|b')."""
  return str(path[-1]).endswith(ADAPTER_SUFFIXES)


def adapter_paths(path) -> tuple[tuple, tuple]:
  """The paths of the weight's Qwix adapters, '{name}_lora_a|b'."""
  return tuple(path[:-1] + (path[-1] + suffix,) for suffix in ADAPTER_SUFFIXES)


def to_lora(
  params: Any, lora_abstract: Any, rules: Sequence[qwix.QuantizationRule]
) -> Any:
  """LQER params -> the params of the same model under `qwix.LoraProvider`.

  Args:
    params: LQER params (Linen tree from `lqer_quantize_params`), or an NNX
      model holding them.
    lora_abstract: the LoRA model's params: `jax.eval_shape(lora_model.init,
      ...)['params']` (Linen), or the NNX model from
      `qwix.apply_lora_to_model`, updated in place.
    rules: the `LoraRule`s of the LoRA model (e.g. from `lora_rules`); each
      adapter's rank and alpha come from the rule matching its weight.

  Returns:
    Linen: the LoRA param tree (base weights exactly as lqer stored them,
    adapters a = A, b = B * rank / alpha in the adapters' dtype and boxing).
    NNX: the updated LoRA model.
  """
  source = _weights(params)
  target = _weights(lora_abstract)
  raw_boxes = _boxes(lora_abstract)
  out, new_boxes = {}, {}
  for path, abs_leaf in target.items():
    if is_adapter(path):
      continue
    if path not in source:
      raise ValueError(
        f'lqer.to_lora: {path_str(path)} is in the LoRA model'
        ' but not in the LQER params'
      )
    leaf, name = source[path], path_str(path)
    a_path, b_path = adapter_paths(path)
    rule = (
      match_rule(rules, path) if isinstance(abs_leaf, _qwix.WithAux) else None
    )
    if a_path in target and not isinstance(abs_leaf, _qwix.WithAux):
      raise ValueError(
        f'lqer.to_lora: {name}: the LoRA model adapts it'
        ' unquantized; give its LoRA rule a weight_qtype.'
      )
    if not isinstance(rule, qwix.LoraRule):
      if isinstance(leaf, WithLqer) and leaf.rank:
        raise ValueError(
          f'lqer.to_lora: {name} has LQER factors of rank {leaf.rank} but'
          ' no LoraRule matches it; the LoRA rules must match the LQER'
          ' rules (lqer.lora_rules(lqer_rules, alpha)).'
        )
      if isinstance(leaf, WithLqer):  # rank 0: a GPTQ / stored base only
        _check_base(leaf, abs_leaf, name)
        leaf = _qwix.WithAux(array=leaf.array, how=abs_leaf.how)
      out[path] = _plain(leaf, abs_leaf, name)
      continue
    if not isinstance(leaf, WithLqer) or not leaf.rank:
      raise ValueError(
        f'lqer.to_lora: {name} gets a LoRA adapter but has no LQER factors'
        f' (found {type(leaf).__name__}); quantize it with an LqerRule that'
        ' has a rank, or leave it out of the LoRA rules.'
      )
    _check_rank(rule, leaf.rank, name)
    _check_base(leaf, abs_leaf, name)
    if a_path in target:
      a, b = _adapter_factors(leaf, target[a_path], target[b_path], name)
    elif isinstance(lora_abstract, nnx.Module):
      raise ValueError(
        f'lqer.to_lora: {name}: the LoRA model has no adapter'
        ' for it; build it with qwix.apply_lora_to_model('
        'model, provider, *inputs, rngs=...).'
      )
    else:
      # Linen DenseGeneral: Qwix 0.1.8 finds the kernel, and so creates and
      # reads its adapters, at apply but not at init. Qwix's dot_general
      # layout and sharding rule (adapters in the scale's dtype).
      a, b = _adapter_factors(leaf, *_dot_general_adapters(leaf), name)
      new_boxes.update(
        _adapter_boxes(leaf.layout, raw_boxes[path], a_path, b_path)
      )
    out[path] = _qwix.WithAux(array=leaf.array, how=abs_leaf.how)
    out[a_path] = a
    # Scaling writes a new buffer: b shares none with the LQER params.
    out[b_path] = b * jnp.asarray(rule.rank / rule.alpha, b.dtype)
  _check_all_read(source, target, 'to_lora')
  return _write(lora_abstract, out, new_boxes)


def from_lora(
  lora_params: Any, abstract: Any, rules: Sequence[qwix.QuantizationRule]
) -> Any:
  """LoRA params (e.g. after fine-tuning) -> LQER params for lqer's fast path.

  Args:
    lora_params: params of the model under `qwix.LoraProvider` (Linen tree)
      or the NNX LoRA model.
    abstract: the LQER model's abstract params (`jax.eval_shape` of the
      `LqerProvider` model's init), or the NNX LQER model, updated in place.
    rules: the LoRA rules (for alpha / rank).

  Returns:
    LQER params with A = a and B = b * alpha / rank in `factor_dtype`
    (Linen), or the updated NNX model. `pack_params` packs them for serving.
  """
  source = _weights(lora_params)
  target = _weights(abstract)
  out = {}
  for path, abs_leaf in target.items():
    name = path_str(path)
    if path not in source:
      raise ValueError(
        f'lqer.from_lora: {name} is in the LQER model but not'
        ' in the LoRA params'
      )
    leaf = source[path]
    a_path, b_path = adapter_paths(path)
    if not isinstance(abs_leaf, WithLqer) or not abs_leaf.rank:
      if a_path in source:
        raise ValueError(
          f'lqer.from_lora: {name} has a LoRA adapter but the LQER model'
          ' gives it no factors; the LQER rules must match the LoRA rules.'
        )
      if isinstance(abs_leaf, WithLqer):  # rank 0: the base only
        _check_base(leaf, abs_leaf, name)
        lay = abs_leaf.layout
        leaf = WithLqer.create(
          array=leaf.array,
          how=abs_leaf.how,
          layout=lay,
          rule=abs_leaf.rule,
          a=jnp.zeros(lay.a_shape(0)),
          b=jnp.zeros(lay.b_shape(0)),
          path=name,
        )
      out[path] = _plain(leaf, abs_leaf, name)
      continue
    if a_path not in source:
      raise ValueError(
        f'lqer.from_lora: {name} needs factors of rank {abs_leaf.rank} but'
        ' the LoRA params have no adapter for it.'
      )
    rule = match_rule(rules, path)
    if not isinstance(rule, qwix.LoraRule):
      raise ValueError(
        f'lqer.from_lora: {name}: no LoraRule among `rules` matches it'
      )
    _check_rank(rule, abs_leaf.rank, name)
    if not isinstance(leaf, _qwix.WithAux):
      raise ValueError(
        f'lqer.from_lora: {name} is not quantized in the LoRA'
        f' params (found {type(leaf).__name__})'
      )
    _check_base(leaf, abs_leaf, name)
    if abs_leaf.rule.factor_qtype is not None:
      # WithLqer.create would cast the float adapters to integers with unit
      # scales: the tuned values rounded away, silently.
      raise ValueError(
        f'lqer.from_lora: {name}: the LQER model stores its factors'
        f' quantized (factor_qtype={abs_leaf.rule.factor_qtype!r}), which'
        ' the tuned adapters are not; build the target model from rules'
        ' with factor_qtype=None (float factors in factor_dtype).'
      )
    layout = abs_leaf.layout
    _check_adapter_shapes(
      layout, rule.rank, source[a_path].shape, source[b_path].shape, name
    )
    dtype = abs_leaf.rule.factor_dtype
    a = _owned(jnp.reshape(source[a_path], layout.a_shape(rule.rank)), dtype)
    b = jnp.reshape(  # scaled: a buffer of its own
      source[b_path] * (rule.alpha / rule.rank), layout.b_shape(rule.rank)
    )
    out[path] = WithLqer.create(
      array=leaf.array,
      how=abs_leaf.how,
      layout=layout,
      rule=abs_leaf.rule,
      a=a,
      b=b,
      path=name,
    )
    _check_finite_factors(out[path], (a_path, b_path), name)
  _check_all_read(source, target, 'from_lora')
  return _write(abstract, out)


def _check_finite_factors(leaf: WithLqer, adapter_paths, name):
  """Refuses factors holding NaN or inf (a diverged fine-tuning run), naming
  the adapter they came from."""
  for factor, path in zip((leaf.a, leaf.b), adapter_paths):
    bad = int(jnp.size(factor) - jnp.sum(jnp.isfinite(factor)))
    if bad:
      raise ValueError(
        f'lqer.from_lora: {name}: its adapter {path_str(path)} gives'
        f' {bad} non-finite value(s) (NaN or inf) of {jnp.size(factor)}'
        f' in factor_dtype {jnp.dtype(factor.dtype).name}; the adapters'
        ' must be finite (restart from the last finite ones, e.g. with a'
        ' lower learning rate).'
      )


def _check_rank(rule, rank, name):
  if rule.rank != rank:
    raise ValueError(
      f'{name}: the LQER factors have rank {rank} but the LoRA rule'
      f' (module_path={rule.module_path!r}) has rank {rule.rank}; use the'
      ' same rank (lqer.lora_rules(lqer_rules, alpha)).'
    )


def _check_base(leaf, abs_leaf, name):
  """The stored base must be one Qwix's LoraProvider applies as is."""
  if isinstance(leaf.array, PackedInt4):
    raise ValueError(
      f'{name}: packed params cannot be converted; convert the'
      ' params from before lqer.pack_params.'
    )
  if getattr(leaf, 'input_scale', None) is not None:
    raise ValueError(
      f'{name}: its base carries per-input-channel scales (W = deq(Wq)'
      " / s: an AWQ base or SVDQuant smoothing) that Qwix's LoraProvider"
      " cannot apply; use base='rtn' or 'gptq' and method 'svd', 'l2qer'"
      " or 'qera' for fine-tuning."
    )
  if getattr(leaf, 'rotation', None) is not None:
    raise ValueError(
      f'{name}: it is stored rotated (Hᵀ W, its input rotated online:'
      " LqerRule(rotate=...)), which Qwix's LoraProvider cannot apply; fine-"
      ' tune from rules without rotate.'
    )
  got = jax.tree.map(lambda x: (x.shape, x.dtype), leaf.array)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), abs_leaf.array)
  if got != want:
    raise ValueError(
      f"{name}: the quantized base does not match the target model's"
      f" ({got} vs {want}); the two models' rules must quantize alike"
      ' (weight_qtype, tile_size).'
    )


def _check_adapter_shapes(layout, rank, a_shape, b_shape, name):
  """Adapters must be in one of Qwix's layouts of this kernel: dot_general's
  (*batch, in, k), (*batch, k, out), or einsum's (*contracting, k),
  (k, *output) (no batch axes: Qwix's einsum LoRA shares lora_b across
  them, which per-batch factors cannot be written as)."""
  forms = [
    (
      (*layout.batch_shape, layout.in_size, rank),
      (*layout.batch_shape, rank, layout.out_size),
    )
  ]
  if not layout.batch_axes:
    forms.append(
      ((*layout.contracting_shape, rank), (rank, *layout.output_shape))
    )
  if (tuple(a_shape), tuple(b_shape)) not in forms:
    raise ValueError(
      f'{name}: LoRA adapters of shapes {(tuple(a_shape), tuple(b_shape))}'
      f' do not fit LQER factors of kernel {layout.shape} (contracting axes'
      f' {layout.contracting_axes}, batch axes {layout.batch_axes}, rank'
      f" {rank}); expected one of {forms}. Qwix's einsum LoRA shares"
      ' lora_b across einsum batch axes; per-batch factors cannot be'
      ' written that way.'
    )


def _adapter_factors(leaf: WithLqer, abs_a, abs_b, name):
  """A, B (dequantized) in Qwix's adapter shapes and dtype."""
  _check_adapter_shapes(leaf.layout, leaf.rank, abs_a.shape, abs_b.shape, name)
  a, b = leaf.factors()  # quantized factors: dequantized
  return (
    _owned(jnp.reshape(a, abs_a.shape), abs_a.dtype),
    jnp.reshape(b, abs_b.shape).astype(abs_b.dtype),  # to_lora scales it
  )


def _owned(x, dtype) -> jax.Array:
  """x in `dtype`, in a buffer of its own. A reshape or cast that changes
  nothing returns its input itself (float32 factors into float32 adapters:
  a = A exactly), so the two trees would share one buffer, and a later
  donation of one (a user's jitted step with donate_argnums) would delete
  the other's. The copy costs one adapter-sized buffer per weight, once per
  conversion. The quantized base stays shared: copying it would double the
  model's memory, and it is frozen (lqer's steps never donate it)."""
  return jnp.array(x, dtype=dtype, copy=True)


def _dot_general_adapters(leaf: WithLqer):
  """Qwix's dot_general adapter shapes: (*batch, in, k), (*batch, k, out)."""
  lay, dtype = leaf.layout, leaf.array.scale.dtype
  return (
    jax.ShapeDtypeStruct((*lay.batch_shape, lay.in_size, leaf.rank), dtype),
    jax.ShapeDtypeStruct((*lay.batch_shape, leaf.rank, lay.out_size), dtype),
  )


def _adapter_boxes(layout, base_box, a_path, b_path) -> dict:
  """Boxes (logical axis names) of new adapters from the base's qvalue box,
  as Qwix derives them: a from the first contracting axis, b from the first
  output axis."""
  qvalue = getattr(getattr(base_box, 'array', None), 'qvalue', None)
  if not isinstance(qvalue, nn_meta.AxisMetadata):
    return {}
  first = lambda axes: axes[0] if axes else None
  a_t = (*layout.batch_axes, first(layout.contracting_axes), None)
  b_t = (*layout.batch_axes, None, first(layout.output_axes))
  return {
    a_path: _qwix.update_boxed(qvalue, value=None, transpose=a_t),
    b_path: _qwix.update_boxed(qvalue, value=None, transpose=b_t),
  }


def _plain(leaf, abs_leaf, name):
  if isinstance(leaf, WithLqer) != isinstance(abs_leaf, WithLqer) or (
    isinstance(leaf, _qwix.WithAux) != isinstance(abs_leaf, _qwix.WithAux)
  ):
    raise ValueError(
      f'{name}: {type(leaf).__name__} in the source but'
      f' {type(abs_leaf).__name__} in the target model'
    )
  return leaf


def _check_all_read(source, target, fn):
  extra = [p for p in source if not is_adapter(p) and p not in target]
  if extra:
    raise ValueError(
      f'lqer.{fn}: params not in the target model: '
      + ', '.join(path_str(p) for p in extra)
    )


def _weights(tree) -> dict[tuple, Any]:
  """{path: leaf}, a quantized weight (WithAux) whole, values unboxed."""
  unbox = lambda x: jax.tree.map(
    _qwix.unbox,
    x,
    is_leaf=lambda v: isinstance(v, nnx.Variable | nn_meta.AxisMetadata),
  )
  if isinstance(tree, nnx.Module):
    out = {}
    for path, module in nnx.iter_graph(tree):
      if isinstance(module, nnx.Module):
        for name, value in vars(module).items():
          if isinstance(value, _qwix.WithAux | nnx.Param):
            out[(*path, name)] = unbox(value)
    return out
  flat = flax.traverse_util.flatten_dict(
    tree, is_leaf=lambda _, x: isinstance(x, _qwix.WithAux)
  )
  return {path: unbox(leaf) for path, leaf in flat.items()}


def _boxes(tree) -> dict[tuple, Any]:
  if isinstance(tree, nnx.Module):
    return {}
  return flax.traverse_util.flatten_dict(
    tree, is_leaf=lambda _, x: isinstance(x, _qwix.WithAux)
  )


def _write(target, flat: dict[tuple, Any], new_boxes=None):
  """Linen: the new tree, boxed as `target` is (and new leaves as
  `new_boxes`). NNX: `target` updated in place."""
  if isinstance(target, nnx.Module):
    pure = {}
    for path, value in flat.items():
      for key, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
        pure[
          path + tuple(k.name if hasattr(k, 'name') else k.key for k in key)
        ] = leaf
    nnx.update(target, flax.traverse_util.unflatten_dict(pure))
    return target
  boxes = _boxes(target) | (new_boxes or {})
  rebox = lambda box, value: jax.tree.map(
    lambda b, v: _qwix.update_boxed(b, value=v),
    box,
    value,
    is_leaf=lambda b: isinstance(b, nn_meta.AxisMetadata),
  )
  return flax.traverse_util.unflatten_dict(
    {
      p: rebox(boxes[p], v) if _boxed(boxes.get(p)) else v
      for p, v in flat.items()
    }
  )


def _boxed(x) -> bool:
  return any(
    isinstance(leaf, nn_meta.AxisMetadata)
    for leaf in jax.tree.leaves(
      x, is_leaf=lambda v: isinstance(v, nn_meta.AxisMetadata)
    )
  )
