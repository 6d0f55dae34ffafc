"""`LqerProvider`: Qwix PTQ inference plus the low-rank branch.

    y = (x' / s) deq(Wq) + (x' A) B   (s: `WithLqer.input_scale`, else 1)

x' = x H for a weight stored rotated (`WithLqer.rotation`, the rule's
`rotate`: H on the contracting axes, flattened in the kernel's order, by a
fast Walsh-Hadamard transform), else x.

The first term is Qwix's own quantized `dot_general` / `einsum` (activation
quantization of x / s included when the rule sets `act_qtype`); the branch
runs on the float activation, accumulates in float32 and is added before
casting to the output dtype. Weights of rules without a rank behave exactly
as under `qwix.PtqProvider`.

During `init` (or the first NNX call) a matched float weight becomes a
`WithLqer`: 'svd' factors are computed right away (free under
`jax.eval_shape` / `nnx.eval_shape`); activation-aware methods get zero
factors of the right shape until `lqer_quantize_params` fills them.
"""

import dataclasses
import functools
import math
import warnings

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import qwix

from lqer import _qwix
from lqer.core import layout as layout_lib
from lqer.core.paths import path_str
from lqer.providers import matmul
from lqer.quant import factor
from lqer.quant import packing
from lqer.quant.rule import LqerRule
from lqer.quant.weight import WithLqer
from lqer.quant.weight import divide_along
from lqer.quant.weight import rotate_along


class LqerProvider(qwix.PtqProvider):
  """Inference provider for LQER params (and plain PTQ params).

  Args:
    rules: the `LqerRule`s (plain Qwix rules work too).
    compute_dtype: for weight-only rules, each weight is dequantized at its
      use to this dtype and multiplied with float32 accumulation
      (`lqer.providers.matmul`, without XLA holding every dequantized
      weight at once): 'auto' (default; per backend and call shape, see
      `lqer.providers.matmul`, for weights with factors or packed; float32
      for plain Qwix weights, so a drop-in for PtqProvider keeps Qwix's
      numbers),
      jnp.float32 (Qwix's numbers: bit for bit for dot_general, to float32
      rounding for einsum, which Qwix runs through opt_einsum) or
      jnp.bfloat16. None runs Qwix's own quantized dot_general. Rules with
      `act_qtype` use Qwix's path, except for weights packed by
      `lqer.pack_params`, which need a compute dtype and, with an act_qtype,
      multiply the input quantized and dequantized as Qwix quantizes it
      (dynamic scales).
    int4_kernel: how packed int4 weights multiply: 'auto' (default: lqer's
      int4 CPU kernel, an XLA FFI call, on CPU where it was built and the
      process has one device; else the XLA path, with one warning naming
      why), 'ffi' (the kernel, or an error) or 'xla' (the blocked XLA
      path, on any backend). The kernel runs each packed weight as one
      call: the branch (lhs A) B (float or integer factors; with an input
      scale s, x / s is divided as on the XLA path and s folded into A) and,
      for Qwix's dynamic int8 activations, their quantization and integer
      dot products (`lqer.quant.packing.kernel_dot_general`). Float
      activations go in cast to the compute dtype ('auto': bfloat16 from
      `matmul.BF16_MIN_TOKENS` tokens on CPU), accumulated in float32;
      bfloat16 ones use AVX-512 BF16 dot products where the CPU has them,
      the int4 values exact (the XLA path rounds q * scale to bfloat16).
  """

  def __init__(
    self, rules, *, compute_dtype='auto', int4_kernel='auto', **kwargs
  ):
    super().__init__(rules, **kwargs)
    if int4_kernel not in packing.KERNELS:
      raise ValueError(
        f'LqerProvider: int4_kernel must be one of {packing.KERNELS}, got'
        f' {int4_kernel!r}'
      )
    self._compute_dtype = compute_dtype
    self._int4_kernel = int4_kernel
    self._weights_matched = [0] * len(_qwix.rules_of(self))

  def process_model_output(self, method_name, model_output):
    """After the first run, warns about rules that matched no weight."""
    if not self._initial_run_complete:
      for rule, count in zip(_qwix.rules_of(self), self._weights_matched):
        if rule.weight_qtype is not None and not count:
          warnings.warn(
            f'LqerProvider: rule {rule} matched no weight: no op under a'
            ' module whose path fully matches its module_path reads a'
            ' param (print the paths with jax.tree_util.keystr over the'
            " float params; a module sharing its parent's scope has its"
            " params at the parent's path)",
            stacklevel=2,
          )
    return super().process_model_output(method_name, model_output)

  def _main(
    self,
    op_name,
    x,
    lhs,
    rhs,
    dimension_numbers,
    output_perm,
    qwix_call,
    act_how,
  ):
    """(x deq(Wq), whether (lhs A) B is already added).

    lqer's weight-only matmul or Qwix's own call; a packed weight takes the
    branch into its blocked matmul, so no full-size branch output is live.
    With an act_qtype, Qwix's call quantizes x; a packed weight instead
    multiplies deq(Q(x)), x quantized as Qwix would (`act_how(rule)`).
    """
    rule = _qwix.current_rule(self, op_name)
    packed = isinstance(rhs.array, packing.PackedInt4)
    if (
      self._compute_dtype is None
      or rule is None
      or (rule.act_qtype is not None and not packed)
    ):
      if packed:
        raise ValueError(
          f'{_qwix.get_current_module_path()}: a packed int4 weight'
          ' (lqer.pack_params) needs LqerProvider(compute_dtype=...) not'
          ' None'
        )
      return qwix_call(), False
    _qwix.count_op(self, op_name)  # keep Qwix's op counting
    if rule.act_qtype is not None and rule.act_static_scale:
      raise ValueError(
        f'{_qwix.get_current_module_path()}: a packed int4 weight'
        ' takes dynamic activation scales only; set'
        ' act_static_scale=False or do not pack this weight'
      )
    if (
      packed
      and packing.fits(rhs.array, dimension_numbers)
      and packing.resolve_kernel(self._int4_kernel) == 'ffi'
    ):
      out, done = _kernel_main(
        x, lhs, rhs, dimension_numbers, rule, act_how, self._compute_dtype
      )
      if output_perm is not None:
        out = jnp.transpose(out, output_perm)
      dtype = jnp.result_type(x.dtype, rhs.array.scale.dtype)
      return out.astype(dtype), done
    if rule.act_qtype is not None:
      x = qwix.dequantize(_qwix.quantize(x, act_how(rule))).astype(x.dtype)
    low_rank = None
    if (
      isinstance(rhs.array, packing.PackedInt4)
      and isinstance(rhs, WithLqer)
      and rhs.rank > 0
    ):
      low_rank = (_branch_input(lhs, rhs, dimension_numbers), rhs.factors()[1])
    compute_dtype = self._compute_dtype
    if (
      compute_dtype == 'auto'
      and not isinstance(rhs, WithLqer)
      and not isinstance(rhs.array, packing.PackedInt4)
    ):
      compute_dtype = jnp.float32  # a plain Qwix weight: Qwix's numbers
    out = matmul.weight_only_dot_general(
      x,
      rhs.array,
      dimension_numbers,
      compute_dtype,
      low_rank,
      self._int4_kernel,
    )
    if output_perm is not None:
      out = jnp.transpose(out, output_perm)
    dtype = jnp.result_type(x.dtype, rhs.array.scale.dtype)
    return out.astype(dtype), low_rank is not None

  def dot_general(
    self,
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    out_sharding=None,
  ):
    how = functools.partial(
      _operand_how,
      _qwix.dot_general_how_to_quantize,
      dimension_numbers=dimension_numbers,
      ndims=(lhs.ndim, rhs.ndim),
    )
    rhs = self._weight(
      rhs,
      'dot_general',
      dimension_numbers[0][1],
      dimension_numbers[1][1],
      how(for_lhs=False),
    )
    if not isinstance(rhs, _qwix.WithAux):
      return super().dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision,
        preferred_element_type,
        out_sharding=out_sharding,
      )
    lhs = _input_rotated(lhs, rhs, dimension_numbers)
    x = _input_scaled(lhs, rhs, dimension_numbers)
    main, done = self._main(
      'dot_general',
      x,
      lhs,
      rhs,
      dimension_numbers,
      None,
      lambda: super(LqerProvider, self).dot_general(
        x,
        rhs,
        dimension_numbers,
        precision,
        preferred_element_type,
        out_sharding=out_sharding,
      ),
      how(for_lhs=True),
    )
    return (
      main if done else _add_branch(main, lhs, rhs, dimension_numbers, None)
    )

  def einsum(
    self,
    einsum_str,
    *operands,
    precision=None,
    preferred_element_type=None,
    _dot_general=jax.lax.dot_general,  # pylint: disable=invalid-name
    out_sharding=None,
  ):
    kwargs = dict(
      precision=precision,
      preferred_element_type=preferred_element_type,
      _dot_general=_dot_general,
      out_sharding=out_sharding,
    )
    if len(operands) != 2 or not isinstance(einsum_str, str):
      return super().einsum(einsum_str, *operands, **kwargs)
    lhs, rhs = operands
    info = _qwix.EinsumInfo.parse(einsum_str, ndims=(lhs.ndim, rhs.ndim))
    dims = info.dimension_numbers
    how = functools.partial(
      _operand_how,
      _qwix.einsum_how_to_quantize,
      einsum_str=einsum_str,
      ndims=(lhs.ndim, rhs.ndim),
    )
    rhs = self._weight(
      rhs, 'einsum', dims[0][1], dims[1][1], how(for_lhs=False)
    )
    if not isinstance(rhs, _qwix.WithAux):
      return super().einsum(einsum_str, lhs, rhs, **kwargs)
    lhs = _input_rotated(lhs, rhs, dims)
    x = _input_scaled(lhs, rhs, dims)
    main, done = self._main(
      'einsum',
      x,
      lhs,
      rhs,
      dims,
      info.output_perm,
      lambda: super(LqerProvider, self).einsum(einsum_str, x, rhs, **kwargs),
      how(for_lhs=True),
    )
    return main if done else _add_branch(main, lhs, rhs, dims, info.output_perm)

  def _weight(self, rhs, op_name, contracting, batch, get_how):
    """The op's right operand, checked once per op (at trace time).

    A param matched by a rule counts as one of the rule's weights. A plain
    Qwix weight under a rule with a rank or a rotation is refused (it would
    run as unrotated PTQ without a word); a matched float weight is checked
    against the param as stored and, under a rule with a rank or a
    rotation, replaced by a `WithLqer` (init / first NNX call).
    """
    rule = _qwix.current_rule(self, op_name)
    quantized = isinstance(rhs, _qwix.WithAux)
    name = (
      None
      if rule is None
      else _qwix.find_param(rhs, _qwix.WithAux if quantized else None)
    )
    if name is None:
      return rhs
    self._weights_matched[_qwix.rules_of(self).index(rule)] += 1
    path = path_str((*_module_path(), name))
    lqer_weight = isinstance(rule, LqerRule) and rule.stores_lqer
    if quantized:
      if lqer_weight and not isinstance(rhs, WithLqer):
        what = (
          f'has rank {rule.rank}'
          if rule.rank is not None
          else f'rotates (rotate={rule.rotate!r})'
        )
        raise ValueError(
          f'{path}: the rule {what} but this weight is a plain Qwix PTQ'
          ' weight without factors or rotation (params from'
          ' qwix.quantize_params or another provider?); build them with'
          ' lqer.lqer_quantize_params, or use a rule with rank=None and'
          ' rotate=None'
        )
      return rhs
    if rule.weight_qtype is None:
      return rhs
    factor.check_shape(path, _stored_param(name).shape, rhs.shape)
    if not lqer_weight:
      return rhs
    try:
      layout = layout_lib.KernelLayout(
        tuple(rhs.shape), tuple(sorted(contracting)), tuple(sorted(batch))
      )
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from None
    weight = factor.build(path, rhs, get_how(rule), layout, rule)
    if not isinstance(rhs, jax.core.Tracer):  # NNX init on real weights
      a, b, a_scale, b_scale = factor.place_factors(
        getattr(rhs, 'sharding', None),
        layout,
        weight.a,
        weight.b,
        weight.a_scale,
        weight.b_scale,
      )
      weight = dataclasses.replace(
        weight, a=a, b=b, a_scale=a_scale, b_scale=b_scale
      )
    _replace_param(name, weight)
    return weight


def _kernel_main(x, lhs, rhs, dimension_numbers, rule, act_how, compute):
  """(x deq(Wq) [+ (lhs A) B], whether the branch is added) on lqer's int4
  CPU kernel, x = lhs / s as the XLA path divides it: one call with the
  branch (s folded into A) and, for Qwix's dynamic int8 activations, their
  quantization (`_kernel_act_tile`). Other activation qtypes are quantized
  and dequantized in XLA first; the branch then follows the call
  (`_add_branch`). Float activations are cast to the compute dtype
  (`matmul.compute_dtype_for`) first."""
  p = rhs.array
  (lhs_c, _), (lhs_b, _) = dimension_numbers
  contracted = math.prod(lhs.shape[a] for a in (*lhs_c, *lhs_b))
  dtype = matmul.compute_dtype_for(compute, lhs.size // max(contracted, 1))
  act_tile = None
  if rule.act_qtype is not None:
    how = act_how(rule)
    act_tile = _kernel_act_tile(how, x, dimension_numbers, p)
    if act_tile is None:
      xq = qwix.dequantize(_qwix.quantize(x, how)).astype(dtype)
      return packing.kernel_dot_general(xq, p, dimension_numbers), False
  else:
    x = x.astype(dtype)
  if not isinstance(rhs, WithLqer) or rhs.rank == 0:
    return packing.kernel_dot_general(
      x, p, dimension_numbers, act_tile=act_tile
    ), True
  factors = tuple(
    None if v is None else _qwix.unbox(v)
    for v in (rhs.a, rhs.b, rhs.a_scale, rhs.b_scale)
  )
  s = rhs.input_scale
  out = packing.kernel_dot_general(
    x,
    p,
    dimension_numbers,
    factors=factors,
    input_scale=None if s is None else _qwix.unbox(s),
    act_tile=act_tile,
  )
  return out, True


def _kernel_act_tile(how, lhs, dimension_numbers, p) -> int | None:
  """The kernel's act_tile for Qwix's activation quantization `how` (0:
  one int8 scale per token; n: per token and n consecutive packed rows),
  or None where the kernel's int8 path does not compute it: a qtype other
  than int8, a calibration other than absmax, scales shared across tokens,
  several tiles along an axis that is not the packed rows' first (Qwix's
  tile of axis a spans the other contracting axes: consecutive rows only
  when a is the slowest), or tiles of a non-float32 input (Qwix's tiled
  matmul then rounds each dequantized tile q s to the input's dtype before
  its dot; the kernel's integer dot does not)."""
  try:
    int8 = jnp.dtype(how.qtype) == jnp.int8
  except TypeError:
    int8 = False
  (lhs_c, rhs_c), _ = dimension_numbers
  per_token = set(how.channelwise_axes) == set(range(lhs.ndim)) - set(lhs_c)
  if (
    not int8
    or how.calibration_method != 'absmax'
    or not per_token
    or len(how.tiled_axes) > 1
  ):
    return None
  if not how.tiled_axes:
    return 0
  ((axis, tile),) = how.tiled_axes.items()
  if not isinstance(tile, int) or lhs.shape[axis] % tile:
    return None
  if tile == lhs.shape[axis]:
    return 0  # one tile: one scale per token
  first_row_axis = lhs_c[list(rhs_c).index(p.layout.contracting_axes[0])]
  if axis != first_row_axis or lhs.dtype != jnp.float32:
    return None
  return tile * math.prod(lhs.shape[a] for a in lhs_c if a != axis)


def _module_path() -> tuple[str, ...]:
  return tuple(map(str, _qwix.get_current_module_path()))


def _stored_param(name):
  """The param `name` of the current module as stored (unboxed)."""
  module = _qwix.get_current_module()
  if isinstance(module, nn.Module):
    return _qwix.unbox(module.get_variable('params', name))
  return _qwix.unbox(getattr(module, name))


def _operand_how(get_how, *, for_lhs: bool, **op):
  """rule -> the HowToQuantize Qwix's `get_how` gives the op's weight
  (for_lhs False: weight_qtype) or its input (act_qtype)."""

  def how(rule):
    if for_lhs:
      qtype, method = rule.act_qtype, rule.act_calibration_method
    else:
      qtype, method = rule.weight_qtype, rule.weight_calibration_method
    return get_how(
      **op,
      for_lhs=for_lhs,
      tile_size=rule.tile_size,
      qtype=qtype,
      calibration_method=method,
    )

  return how


def _input_rotated(lhs, rhs, dimension_numbers):
  """x H on the contracting axes (in the kernel's order), so
  x H (Hᵀ W) = x W for a weight stored rotated; else x."""
  signs = getattr(rhs, 'rotation', None)
  if signs is None:
    return lhs
  (lhs_ca, rhs_ca), _ = dimension_numbers
  by_kernel_axis = [l for _, l in sorted(zip(rhs_ca, lhs_ca))]
  return rotate_along(lhs, _qwix.unbox(signs), by_kernel_axis)


def _input_scaled(lhs, rhs, dimension_numbers):
  """x / s along the contracting axes, so x deq(Wq) = x (deq(Wq) / s)."""
  if getattr(rhs, 'input_scale', None) is None:
    return lhs
  (lhs_ca, rhs_ca), _ = dimension_numbers
  by_kernel_axis = [l for _, l in sorted(zip(rhs_ca, lhs_ca))]
  return divide_along(lhs, rhs.input_scale, by_kernel_axis)


def _branch_input(lhs, rhs: WithLqer, dimension_numbers):
  """x A in float32, shaped (*lhs non-contracting, k)."""
  first, _ = rhs.layout.branch_dimension_numbers(lhs.ndim, dimension_numbers)
  return jax.lax.dot_general(
    lhs,
    rhs.factors()[0].astype(lhs.dtype),
    first,
    preferred_element_type=jnp.float32,
  )


def _add_branch(main, lhs, rhs, dimension_numbers, output_perm):
  """main + (x A) B, the branch accumulated in float32."""
  if not isinstance(rhs, WithLqer) or rhs.rank == 0:
    return main
  _, second = rhs.layout.branch_dimension_numbers(lhs.ndim, dimension_numbers)
  xa = _branch_input(lhs, rhs, dimension_numbers)
  branch = jax.lax.dot_general(
    xa, rhs.factors()[1], second, preferred_element_type=jnp.float32
  )
  if output_perm is not None:
    branch = jnp.transpose(branch, output_perm)
  return (main.astype(jnp.float32) + branch).astype(main.dtype)


def _replace_param(name, weight: WithLqer):
  """Stores `weight` in place of the float param, keeping sharding metadata.

  A is laid out along the kernel's batch and contracting axes, B along its
  batch and output axes, so each factor follows the sharding of W on the axes
  it shares with W and is replicated over the rank axis; an input scale
  follows the contracting axis, factor scales the batch axes.
  """
  module = _qwix.get_current_module()
  if isinstance(module, nn.Module):
    if not module.is_initializing():
      raise ValueError(
        f'{name}: a float weight was fed to an LQER model outside init;'
        ' build the params with lqer.lqer_quantize_params'
      )
    param = module.get_variable('params', name)
  else:
    param = getattr(module, name)
  layout = weight.layout
  a_axes = (*layout.batch_axes, *layout.contracting_axes, None)
  b_axes = (*layout.batch_axes, None, *layout.output_axes)
  # input_scale (in,) flattens the contracting axes: named after the one
  # contracting axis, replicated when there are several.
  s_axes = (
    layout.contracting_axes if len(layout.contracting_axes) == 1 else (None,)
  )
  nb = len(layout.batch_axes)
  scale_axes = lambda n: (*layout.batch_axes, *[None] * (n - nb))
  axes = dict(
    a=a_axes,
    b=b_axes,
    a_scale=scale_axes(len(a_axes)),
    b_scale=scale_axes(len(b_axes)),
    input_scale=s_axes,
    rotation=(None, None),  # the signs, replicated
  )
  boxed = dataclasses.replace(
    jax.tree.map(
      lambda v: _qwix.update_boxed(param, value=v),
      dataclasses.replace(weight, **{k: None for k in axes}),
    ),
    **{
      k: None
      if getattr(weight, k) is None
      else _box_factor(param, getattr(weight, k), v)
      for k, v in axes.items()
    },
  )
  if isinstance(module, nn.Module):
    module.put_variable('params', name, boxed)
  else:
    setattr(module, name, boxed)


def _box_factor(param, value, kernel_axes):
  """Boxes a factor like `param`, its axis names taken from kernel_axes."""
  if isinstance(param, nn.meta.AxisMetadata):
    names = getattr(param, 'names', None)
    if names is None:
      return value
    new = tuple(None if a is None else names[a] for a in kernel_axes)
    return dataclasses.replace(param.replace_boxed(value), names=new)
  if isinstance(param, nnx.Variable):
    boxed = param.replace(value)
    metadata = boxed.get_metadata()
    key = 'out_sharding' if 'out_sharding' in metadata else 'sharding_names'
    names = metadata.get(key)
    if names is not None:
      boxed.set_metadata(
        key, tuple(None if a is None else names[a] for a in kernel_axes)
      )
    return boxed
  return value
