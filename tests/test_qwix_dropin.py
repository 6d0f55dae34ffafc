"""lqer as a drop-in for Qwix PTQ: Qwix's own tests, ported.

Each test below is a case of Qwix's test suite (the file and test it comes
from are named in its docstring) with `qwix.PtqProvider` replaced by
`lqer.LqerProvider`, `qwix.QuantizationRule` by `lqer.LqerRule` and
`qwix.quantize_params` by `lqer.lqer_quantize_params`. Qwix's assertions are
kept, run on the lqer flow, and two more are added:

* rank=None: lqer is plain Qwix PTQ. Params (every leaf, bit for bit, and the
  tree structure) and model outputs equal those of the same flow under
  `qwix.PtqProvider` / `qwix.quantize_params` exactly.
* rank=4 (method 'svd', data-free): the flow runs wherever PTQ runs, the
  matched weights are `lqer.WithLqer`, their quantized base is PTQ's (or the
  GPTQ / QEP / AWQ base they were refitted on) and the output error against
  the float model is strictly below PTQ's (`assert_no_worse`).

Weights and inputs are random (Qwix's tests often use ones, where a
low-rank error term would be degenerate). Shapes are small; the runtime
(~1.5 min on two CPU cores) is nearly all XLA compiling the many small
eager ops of Qwix's flows (GPTQ's alone ~8 s).

Like Qwix's ptq_test.py / checkpoint_util_test.py, the sharding tests want
four host devices: the module asks XLA for them when it is the first to start
JAX (run alone); otherwise (JAX already started by another test module) they
run on a 1x1 mesh, which still checks the axis names and the placement.

Qwix here is the installed 0.1.8; the tests come from the Qwix mirror's
HEAD, whose einsum dict tile sizes 0.1.8 lacks (those tests xfail, saying
so, until Qwix is upgraded).

Not ported (see each section): tests that exercise only Qwix internals that
lqer neither replaces nor touches (calibration-only collection, QEP's stage
discovery and argument errors, normalize_weight, QT checkpoint templates).
"""

import os


def _request_host_devices(n: int) -> None:
  """Four CPU devices for the mesh tests, if JAX has not started yet."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if xla_bridge.backends_are_initialized():
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' in flags:
    return
  os.environ['XLA_FLAGS'] = (
    f'{flags} --xla_force_host_platform_device_count={n}'.strip()
  )
  try:
    import jax  # pylint: disable=g-import-not-at-top

    jax.devices()  # starts the backend with the flag
  finally:  # later subprocesses (other tests) see the caller's flags
    if flags:
      os.environ['XLA_FLAGS'] = flags
    else:
      del os.environ['XLA_FLAGS']


_request_host_devices(4)

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
from unittest import mock

from flax import linen as nn
from flax import nnx
import jax
from jax import export
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from qwix._src import averaging
from qwix._src import qconfig
from qwix._src.core import dot_general as core_dot
from qwix._src.core import einsum as core_einsum
from qwix._src.core import qarray
from qwix._src.providers import ptq
from qwix._src.utils import checkpoint_util
from qwix._src.utils import flax_util
from qwix.contrib import awq
from qwix.contrib import calibration as qwix_calibration
from qwix.contrib import gptq
from qwix.contrib import gptq_core
from qwix.contrib import padded_ptq
from qwix.contrib import qep
from qwix.contrib import smooth_quant as sq

import lqer
from lqer import LqerProvider
from lqer import LqerRule
from lqer import lqer_quantize_params
from lqer.checkpoints import tree as lqer_checkpoint

KEY = jax.random.key(0)
RANK = 4
RANKS = pytest.mark.parametrize(
  'rank', [None, RANK], ids=['rank_none', f'rank{RANK}']
)


# ----------------------------------------------------------------- helpers


def lqer_rules(rank, **kwargs):
  return [LqerRule(rank=rank, **kwargs)]


def qwix_rules(**kwargs):
  return [qwix.QuantizationRule(**kwargs)]


def _np(x):
  """A leaf as a NumPy array that assert_array_equal can compare exactly."""
  x = jnp.asarray(flax_util.unbox(x))
  if jnp.issubdtype(x.dtype, jnp.integer):
    return np.asarray(x.astype(jnp.int32))
  if jnp.issubdtype(x.dtype, jnp.floating):
    return np.asarray(x.astype(jnp.float32))  # exact for <= 32-bit floats
  return np.asarray(x)


def assert_trees_equal(actual, expected):
  """Same structure (incl. WithAux / how / boxes) and bit-equal leaves."""
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
  e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
  assert a_def == e_def, f'tree structures differ:\n{a_def}\n{e_def}'
  for (path, x), (_, y) in zip(a_leaves, e_leaves):
    name = jax.tree_util.keystr(path)
    if isinstance(x, jax.ShapeDtypeStruct) or isinstance(
      y, jax.ShapeDtypeStruct
    ):
      assert (x.shape, x.dtype) == (y.shape, y.dtype), name
      continue
    assert jnp.asarray(x).dtype == jnp.asarray(y).dtype, name
    np.testing.assert_array_equal(_np(x), _np(y), err_msg=name)


def assert_trees_allclose(actual, expected):
  """Qwix's _assert_trees_allclose / map_with_path(allclose) check."""
  jax.tree.map_with_path(
    lambda kp, x, y: np.testing.assert_allclose(
      _np(x), _np(y), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(kp)
    ),
    actual,
    expected,
  )


def rel_err(y, ref):
  y = jnp.asarray(y, jnp.float32)
  ref = jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def mae(a, b):
  return jnp.mean(jnp.abs(a - b))


# WithLqer.replace's error when Qwix swaps the base under the factors.
BASE_REPLACED = 'replaced without refitting the factors'


def assert_einsum_outputs_match(y, y_qwix):
  """Equal params give einsum outputs equal to float32 rounding: lqer's
  dequantize-at-use matmul contracts x with deq(Wq) directly, Qwix's einsum
  goes through opt_einsum's contraction path (1-ulp differences);
  LqerProvider(compute_dtype=None) runs Qwix's own and is bit-exact."""
  np.testing.assert_allclose(y, y_qwix, rtol=1e-5, atol=1e-6)


def assert_no_worse(y_lqer, y_base, y_fp, what='PTQ'):
  """The rank-4 factors lower the output error against the float model,
  strictly, where the base has an error to remove: zero factors (the same
  base alone) would give an equal error and fail."""
  e_lqer, e_base = rel_err(y_lqer, y_fp), rel_err(y_base, y_fp)
  assert e_lqer < e_base or e_base < 1e-6, (
    f'LQER error {e_lqer:.4g} not below {what} error {e_base:.4g}'
  )


def assert_base_equal(weight, reference):
  """The QArray of `weight` is bit-equal to the one of `reference`."""
  assert_trees_equal(nn.unbox(weight.array), nn.unbox(reference.array))


def canonical_pspec(x):
  """The sharding.spec may be shorter than the ndim."""
  spec = tuple(x.sharding.spec)
  return jax.sharding.PartitionSpec(*(spec + (None,) * (x.ndim - len(spec))))


def assert_same_shardings(actual, expected):
  """Qwix's `x.sharding == y.sharding`, as placement: P('fsdp') and
  P('fsdp', None) are the same, and so is every spec on a 1x1 mesh."""

  def check(kp, a, b):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
      f'{jax.tree_util.keystr(kp)}: {a.sharding} != {b.sharding}'
    )

  jax.tree.map_with_path(check, actual, expected)


def assert_pspec(x, mesh, spec):
  """Qwix's `get_canonical_pspec(x) == P(*spec)` on the 2x2 mesh; on the
  1x1 fallback mesh XLA may report P() for any spec, so placement."""
  expected = jax.sharding.PartitionSpec(*spec)
  if mesh.size > 1:
    assert canonical_pspec(x) == expected
  else:
    assert x.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, expected), x.ndim
    )


def make_mesh(names):
  shape = (2, 2) if jax.device_count() >= 4 else (1, 1)
  return jax.make_mesh(
    shape, names, axis_types=(jax.sharding.AxisType.Auto,) * 2
  )


def nnx_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def qwix_einsum_takes_dict_tiles() -> bool:
  """Whether the installed Qwix's einsum accepts tile_size={axis: size}
  (added after Qwix 0.1.8, with test_nnx_einsum_2d_scales_ptq)."""
  how = core_einsum.get_how_to_quantize(
    einsum_str='ij,jk->ik',
    ndims=(2, 2),
    for_lhs=False,
    qtype=jnp.int8,
    tile_size={0: 2, 1: 2},
    calibration_method='absmax',
  )
  return all(not isinstance(v, dict) for v in how.tiled_axes.values())


# ============================================= tests/_src/providers/ptq_test.py


@RANKS
def test_nn_ptq_with_partitioning(rank):
  """ptq_test.test_nn_ptq: boxed (nn.with_partitioning) Linen params."""
  dense = nn.Dense(
    features=5,
    kernel_init=nn.with_partitioning(
      nn.initializers.lecun_normal(), ('contraction', 'remaining')
    ),
  )
  kw = dict(module_path='.*', weight_qtype=jnp.int8, tile_size=4)
  lqer_dense = qwix.quantize_model(dense, LqerProvider(lqer_rules(rank, **kw)))
  x = jax.random.normal(KEY, (10, 12))
  # Can be initialized, both actually and in eval_shape.
  init_params = lqer_dense.init(KEY, x)['params']
  abs_params = jax.eval_shape(lqer_dense.init, KEY, x)['params']
  qw = abs_params['kernel']
  assert isinstance(qw, ptq.WithAux)
  assert isinstance(qw, lqer.WithLqer) == (rank is not None)
  q = qw.array
  assert isinstance(q.qvalue, nn.Partitioned)
  assert isinstance(q.scale, nn.Partitioned)
  assert q.qvalue.value.dtype == jnp.int8
  assert q.qvalue.value.shape == (12, 5)
  assert q.qvalue.names == ('contraction', 'remaining')
  assert q.scale.value.shape == (3, 5)
  assert q.scale.names == ('contraction', 'remaining')
  if rank is not None:
    # The factors follow W's sharding on the axes they share with it.
    assert isinstance(qw.a, nn.Partitioned)
    assert isinstance(qw.b, nn.Partitioned)
    assert qw.a.value.shape == (12, rank)
    assert qw.a.names == ('contraction', None)
    assert qw.b.value.shape == (rank, 5)
    assert qw.b.names == (None, 'remaining')

  orig_params = nn.unbox(dense.init(KEY, x)['params'])
  quantized = lqer_quantize_params(orig_params, abs_params)
  # Same structure as the abstract tree.
  jax.tree.map(lambda *_: ..., quantized, abs_params)
  # Same as the params init quantized itself.
  assert_trees_allclose(quantized, nn.unbox(init_params))
  y = lqer_dense.apply({'params': quantized}, x)
  # Linen models don't allow implicit quantization.
  with pytest.raises(ValueError):
    lqer_dense.apply({'params': orig_params}, x)

  ptq_dense = qwix.quantize_model(dense, qwix.PtqProvider(qwix_rules(**kw)))
  ptq_abs = jax.eval_shape(ptq_dense.init, KEY, x)['params']
  ptq_params = qwix.quantize_params(orig_params, ptq_abs)
  y_ptq = ptq_dense.apply({'params': ptq_params}, x)
  if rank is None:
    assert_trees_equal(abs_params, ptq_abs)
    assert_trees_equal(quantized, ptq_params)
    np.testing.assert_array_equal(y, y_ptq)
  else:
    assert_base_equal(quantized['kernel'], ptq_params['kernel'])
    assert_no_worse(y, y_ptq, dense.apply({'params': orig_params}, x))


@pytest.mark.parametrize(
  'act_calibration_method', ['absmax', 'minmax', 'rms,7']
)
@RANKS
def test_nn_srq(act_calibration_method, rank):
  """ptq_test.test_nn_srq: static-range activations, quant_stats from QT."""
  dense = nn.Dense(features=5)
  kw = dict(
    module_path='.*',
    weight_qtype=jnp.int8,
    act_qtype=jnp.int8,
    act_static_scale=True,
    act_calibration_method=act_calibration_method,
  )
  x = jax.random.normal(KEY, (10, 12))

  # QT to generate quant_stats (QtProvider turns rules into QtRules; it
  # takes Qwix's rules, the calibration step is Qwix's own).
  qt_dense = qwix.quantize_model(dense, qwix.QtProvider(qwix_rules(**kw)))
  qt_variables = qt_dense.init(KEY, x)
  quant_stat = qt_variables['quant_stats']['dot_general0_lhs']
  assert quant_stat['count'].shape == ()
  assert quant_stat['count'] == 0
  if act_calibration_method == 'minmax':
    assert quant_stat['sum_of_min'].shape == (1, 1)
    assert quant_stat['sum_of_max'].shape == (1, 1)
  else:
    assert quant_stat['sum_of_absmax'].shape == (1, 1)
  _, new_vars = qt_dense.apply(qt_variables, x, mutable='quant_stats')
  quant_stats = new_vars['quant_stats']
  assert quant_stats['dot_general0_lhs']['count'] == 1

  # PTQ, with LqerProvider.
  lqer_dense = qwix.quantize_model(dense, LqerProvider(lqer_rules(rank, **kw)))
  abs_params = jax.eval_shape(lqer_dense.init, KEY, x)['params']
  assert 'dot_general0_lhs_scale' in abs_params
  assert isinstance(abs_params['dot_general0_lhs_scale'], ptq.WithAux)
  assert abs_params['dot_general0_lhs_scale'].array.shape == (1, 1)
  if act_calibration_method == 'minmax':
    assert 'dot_general0_lhs_zero_point' in abs_params
    assert abs_params['dot_general0_lhs_zero_point'].shape == (1, 1)
  quantized = lqer_quantize_params(
    qt_variables['params'], abs_params, quant_stats
  )
  jax.tree.map(lambda *_: ..., quantized, abs_params)
  y = lqer_dense.apply({'params': quantized}, x)

  ptq_dense = qwix.quantize_model(dense, qwix.PtqProvider(qwix_rules(**kw)))
  ptq_abs = jax.eval_shape(ptq_dense.init, KEY, x)['params']
  ptq_params = qwix.quantize_params(
    qt_variables['params'], ptq_abs, quant_stats
  )
  y_ptq = ptq_dense.apply({'params': ptq_params}, x)
  if rank is None:
    assert_trees_equal(quantized, ptq_params)
    np.testing.assert_array_equal(y, y_ptq)
  else:
    assert isinstance(quantized['kernel'], lqer.WithLqer)
    assert_base_equal(quantized['kernel'], ptq_params['kernel'])
    for name in ('dot_general0_lhs_scale', 'dot_general0_lhs_zero_point'):
      if name in ptq_params:
        assert_trees_equal(quantized[name], ptq_params[name])
    y_fp = dense.apply({'params': qt_variables['params']}, x)
    assert_no_worse(y, y_ptq, y_fp)


@RANKS
def test_nnx_ptq_both_methods_on_a_mesh(rank):
  """ptq_test.test_nnx_ptq: implicit quantize_model == eval_shape +
  quantize_params, sharding names kept."""
  mesh = make_mesh(('contraction', 'remaining'))
  kw = dict(module_path='.*', weight_qtype=jnp.int8, tile_size=4)
  x = jax.random.normal(KEY, (10, 12))

  with jax.set_mesh(mesh):
    fp_linear = nnx.Linear(
      in_features=12,
      out_features=6,
      rngs=nnx.Rngs(0),
      kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ('contraction', 'remaining')
      ),
    )
    # Method 1: quantize_model converts the model and its params.
    lqer_linear = qwix.quantize_model(
      fp_linear, LqerProvider(lqer_rules(rank, **kw)), x
    )
  qw = lqer_linear.kernel
  assert isinstance(qw, ptq.WithAux)
  assert isinstance(qw, lqer.WithLqer) == (rank is not None)
  q = qw.array
  assert q.qvalue.dtype == jnp.int8
  assert q.qvalue.shape == (12, 6)
  assert q.qvalue.sharding_names == ('contraction', 'remaining')
  assert q.scale.shape == (3, 6)
  assert q.scale.sharding_names == ('contraction', 'remaining')
  if rank is not None:
    assert qw.a.shape == (12, rank)
    assert qw.a.sharding_names == ('contraction', None)
    assert qw.b.shape == (rank, 6)
    assert qw.b.sharding_names == (None, 'remaining')

  # Method 2: eval_shape + quantize_params.
  with jax.set_mesh(mesh):
    abs_linear = nnx.eval_shape(
      lambda: qwix.quantize_model(
        fp_linear, LqerProvider(lqer_rules(rank, **kw)), x
      )
    )
  quantized = lqer_quantize_params(nnx_params(fp_linear), abs_linear)
  nnx.update(abs_linear, quantized)
  y = abs_linear(x)
  # The two methods give the same result.
  assert_trees_allclose(nnx.state(abs_linear), nnx.state(lqer_linear))

  with jax.set_mesh(mesh):
    ptq_linear = qwix.quantize_model(
      fp_linear, qwix.PtqProvider(qwix_rules(**kw)), x
    )
    abs_ptq = nnx.eval_shape(
      lambda: qwix.quantize_model(
        fp_linear, qwix.PtqProvider(qwix_rules(**kw)), x
      )
    )
  ptq_params = qwix.quantize_params(nnx_params(fp_linear), abs_ptq)
  y_ptq = ptq_linear(x)
  if rank is None:
    assert_trees_equal(quantized, ptq_params)
    assert_trees_equal(nnx.state(lqer_linear), nnx.state(ptq_linear))
    np.testing.assert_array_equal(y, y_ptq)
    np.testing.assert_array_equal(lqer_linear(x), y_ptq)
  else:
    assert_base_equal(lqer_linear.kernel, ptq_linear.kernel)
    assert_no_worse(y, y_ptq, fp_linear(x))


@RANKS
def test_nnx_einsum_sharding_ptq(rank):
  """ptq_test.test_nnx_einsum_sharding_ptq: shardings of qvalue, scale (and
  the factors) equal between the implicit and the quantize_params flow."""
  mesh = make_mesh(('fsdp', 'tp'))
  kw = dict(module_path='.*', weight_qtype=jnp.int8, tile_size=4)
  x = jax.random.normal(KEY, (10, 1, 16))
  with jax.set_mesh(mesh):
    fp_einsum = nnx.Einsum(
      'btd,dnh->btnh',
      (16, 8, 10),
      (8, 10),
      rngs=nnx.Rngs(0),
      kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ('fsdp', 'tp', None)
      ),
      bias_init=nnx.with_partitioning(nnx.initializers.normal(), ('tp', None)),
    )
  # Shard the float model in place.
  state = nnx.state(fp_einsum)
  nnx.update(
    fp_einsum, jax.device_put(state, nnx.get_named_sharding(state, mesh))
  )
  assert fp_einsum.kernel.sharding_names == ('fsdp', 'tp', None)
  assert_pspec(fp_einsum.kernel.value, mesh, ('fsdp', 'tp', None))
  assert fp_einsum.bias.sharding_names == ('tp', None)
  assert_pspec(fp_einsum.bias.value, mesh, ('tp', None))

  with jax.set_mesh(mesh):
    lqer_einsum = qwix.quantize_model(
      fp_einsum, LqerProvider(lqer_rules(rank, **kw)), x
    )
  qw = lqer_einsum.kernel
  assert isinstance(qw, ptq.WithAux)
  assert isinstance(qw, lqer.WithLqer) == (rank is not None)
  q = qw.array
  assert q.qvalue.dtype == jnp.int8
  assert q.qvalue.shape == (16, 8, 10)
  assert q.qvalue.sharding_names == ('fsdp', 'tp', None)
  assert_pspec(q.qvalue.value, mesh, ('fsdp', 'tp', None))
  assert q.scale.shape == (4, 8, 10)
  assert q.scale.sharding_names == ('fsdp', 'tp', None)
  assert_pspec(q.scale.value, mesh, ('fsdp', 'tp', None))
  if rank is not None:
    # A: (d, k) sharded like W's contracting axis, B: (k, n, h) like its
    # output axes, the rank axis replicated.
    assert qw.a.shape == (16, rank)
    assert qw.a.sharding_names == ('fsdp', None)
    assert_pspec(qw.a.value, mesh, ('fsdp', None))
    assert qw.b.shape == (rank, 8, 10)
    assert qw.b.sharding_names == (None, 'tp', None)
    assert_pspec(qw.b.value, mesh, (None, 'tp', None))

  with jax.set_mesh(mesh):
    abs_einsum = nnx.eval_shape(
      lambda: qwix.quantize_model(
        fp_einsum, LqerProvider(lqer_rules(rank, **kw)), x
      )
    )
  quantized = lqer_quantize_params(nnx_params(fp_einsum), abs_einsum)
  nnx.update(abs_einsum, quantized)
  y = abs_einsum(x)
  # The two methods give the same sharding (and values); specs compared
  # with trailing Nones filled in (P('fsdp') == P('fsdp', None)).
  assert_same_shardings(
    nnx.to_pure_dict(nnx.state(abs_einsum)),
    nnx.to_pure_dict(nnx.state(lqer_einsum)),
  )
  assert_trees_allclose(nnx.state(abs_einsum), nnx.state(lqer_einsum))

  with jax.set_mesh(mesh):
    ptq_einsum = qwix.quantize_model(
      fp_einsum, qwix.PtqProvider(qwix_rules(**kw)), x
    )
  y_ptq = ptq_einsum(x)
  if rank is None:
    assert_trees_equal(nnx.state(lqer_einsum), nnx.state(ptq_einsum))
    assert_einsum_outputs_match(y, y_ptq)
  else:
    assert_base_equal(lqer_einsum.kernel, ptq_einsum.kernel)
    assert_no_worse(y, y_ptq, fp_einsum(x))


@pytest.mark.parametrize('act_calibration_method', ['absmax', 'minmax'])
@RANKS
def test_nnx_srq(act_calibration_method, rank):
  """ptq_test.test_nnx_srq: quantize_model of a QT model == eval_shape +
  quantize_params(params, abstract, quant_stats)."""
  kw = dict(
    module_path='.*',
    weight_qtype=jnp.int8,
    act_qtype=jnp.int8,
    act_static_scale=True,
    act_calibration_method=act_calibration_method,
  )
  x = jax.random.normal(KEY, (10, 12))
  qt_linear = qwix.quantize_model(
    nnx.Linear(in_features=12, out_features=5, rngs=nnx.Rngs(0)),
    qwix.QtProvider(qwix_rules(**kw)),
    x,
  )
  qt_linear(x)
  quant_stats = nnx.state(qt_linear, flax_util.QuantStat)
  quant_stat = quant_stats['dot_general0_lhs'].value
  assert quant_stat['count'].shape == ()
  assert quant_stat['count'] == 1
  if act_calibration_method == 'minmax':
    assert quant_stat['sum_of_min'].shape == (1, 1)
    assert quant_stat['sum_of_max'].shape == (1, 1)
  else:
    assert quant_stat['sum_of_absmax'].shape == (1, 1)

  provider = lambda: LqerProvider(lqer_rules(rank, **kw))
  # Method 1: quantize_model converts params and quant_stats.
  lqer_linear = qwix.quantize_model(qt_linear, provider(), x)
  assert isinstance(lqer_linear.dot_general0_lhs_scale, ptq.WithAux)
  assert lqer_linear.dot_general0_lhs_scale.array.shape == (1, 1)
  if act_calibration_method == 'minmax':
    assert lqer_linear.dot_general0_lhs_zero_point.shape == (1, 1)
  # Method 2: quantize_params.
  abs_linear = nnx.eval_shape(
    lambda: qwix.quantize_model(qt_linear, provider(), x)
  )
  quantized = lqer_quantize_params(
    nnx_params(qt_linear), abs_linear, nnx.to_pure_dict(quant_stats)
  )
  nnx.update(abs_linear, quantized)
  y = abs_linear(x)
  assert_trees_allclose(nnx.state(abs_linear), nnx.state(lqer_linear))

  ptq_linear = qwix.quantize_model(
    qt_linear, qwix.PtqProvider(qwix_rules(**kw)), x
  )
  y_ptq = ptq_linear(x)
  if rank is None:
    assert_trees_equal(nnx.state(lqer_linear), nnx.state(ptq_linear))
    np.testing.assert_array_equal(y, y_ptq)
  else:
    assert isinstance(lqer_linear.kernel, lqer.WithLqer)
    assert_base_equal(lqer_linear.kernel, ptq_linear.kernel)
    y_fp = nnx.Linear(12, 5, rngs=nnx.Rngs(0))(x)
    assert_no_worse(y, y_ptq, y_fp)


@RANKS
def test_dot_pallas_call_is_not_intercepted(rank):
  """ptq_test.test_dot_pallas_call: a dot inside pallas_call stays float."""
  rank = rank and 1  # w1 is (32, 1)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      w1 = self.param('w1', nn.initializers.normal(), (x.shape[-1], 1))
      w2 = self.param('w2', nn.initializers.normal(), (1, x.shape[-1]))
      out_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
      assert qconfig.get_current_rule('dot_general') is not None

      @functools.partial(pl.pallas_call, out_shape=out_shape, interpret=True)
      def pallas_dot(x, y, out):
        out[...] = jax.lax.dot(x[...], y[...])

      return pallas_dot(jax.numpy.dot(x, w1), w2)

  kw = dict(
    module_path='.*', weight_qtype=jnp.int8, act_qtype=jnp.int8, tile_size=4
  )  # tile_size errors if pallas_dot is intercepted
  x = jax.random.normal(KEY, (16, 32))
  lqer_model = qwix.quantize_model(
    Model(), LqerProvider(lqer_rules(rank, **kw))
  )
  variables = lqer_model.init(KEY, x)
  assert isinstance(variables['params']['w1'], ptq.WithAux)
  assert isinstance(variables['params']['w1'], lqer.WithLqer) == bool(rank)
  assert isinstance(variables['params']['w2'], jax.Array)
  y = lqer_model.apply(variables, x)

  ptq_model = qwix.quantize_model(Model(), qwix.PtqProvider(qwix_rules(**kw)))
  ptq_variables = ptq_model.init(KEY, x)
  if rank is None:
    assert_trees_equal(variables, ptq_variables)
    np.testing.assert_array_equal(y, ptq_model.apply(ptq_variables, x))
  else:
    # The model asserts a current rule: the float reference runs under a
    # rule that quantizes nothing.
    fp_model = qwix.quantize_model(Model(), qwix.PtqProvider(qwix_rules()))
    assert_no_worse(
      y,
      ptq_model.apply(ptq_variables, x),
      fp_model.apply(fp_model.init(KEY, x), x),
    )


@RANKS
def test_symbolic_export(rank):
  """ptq_test.test_symbolic_export: jax.export with a symbolic batch."""
  model = nn.Dense(features=5)
  kw = dict(
    module_path='.*', weight_qtype=jnp.int8, act_qtype=jnp.int8, tile_size=4
  )
  lqer_model = qwix.quantize_model(model, LqerProvider(lqer_rules(rank, **kw)))
  x = jax.random.normal(KEY, (16, 32))
  variables = lqer_model.init(KEY, x)
  (b,) = export.symbolic_shape('b')
  exp = export.export(jax.jit(lqer_model.apply))(
    variables, jax.ShapeDtypeStruct((b, 32), jnp.float32)
  )
  assert exp.out_avals[0].shape == (b, 5)
  y = exp.call(variables, x[:7])
  np.testing.assert_allclose(
    y, lqer_model.apply(variables, x[:7]), rtol=1e-5, atol=1e-5
  )
  if rank is None:
    ptq_model = qwix.quantize_model(model, qwix.PtqProvider(qwix_rules(**kw)))
    ptq_vars = ptq_model.init(KEY, x)
    assert_trees_equal(variables, ptq_vars)
    ptq_exp = export.export(jax.jit(ptq_model.apply))(
      ptq_vars, jax.ShapeDtypeStruct((b, 32), jnp.float32)
    )
    np.testing.assert_array_equal(y, ptq_exp.call(ptq_vars, x[:7]))
  else:
    assert isinstance(variables['params']['kernel'], lqer.WithLqer)


@RANKS
def test_nnx_scan(rank):
  """ptq_test.test_nnx_scan: layers stacked by nnx.vmap, run by nnx.scan."""

  class ScanModel(nnx.Module):
    def __init__(self, n_layers: int, rngs: nnx.Rngs):
      @nnx.split_rngs(splits=n_layers)
      @nnx.vmap(axis_size=n_layers)
      def create_layer(rngs: nnx.Rngs):
        return nnx.Linear(in_features=12, out_features=12, rngs=rngs)

      self.layers = create_layer(rngs)

    def __call__(self, x):
      @nnx.scan(out_axes=nnx.Carry)
      def scan_fn(x: jax.Array, layer):
        return layer(x)

      return scan_fn(x, self.layers)

  model = ScanModel(n_layers=2, rngs=nnx.Rngs(0))
  assert model.layers.kernel.value.shape == (2, 12, 12)
  x = jax.random.normal(KEY, (10, 12))
  lqer_model = qwix.quantize_model(
    model, LqerProvider(lqer_rules(rank, weight_qtype=jnp.int8)), x
  )
  kernel = lqer_model.layers.kernel
  assert isinstance(kernel, ptq.WithAux)
  assert isinstance(kernel.array, qarray.QArray)
  assert kernel.array.shape == (2, 12, 12)
  assert kernel.array.qtype == jnp.int8
  y = lqer_model(x)

  ptq_model = qwix.quantize_model(
    model, qwix.PtqProvider(qwix_rules(weight_qtype=jnp.int8)), x
  )
  y_ptq = ptq_model(x)
  if rank is None:
    assert_trees_equal(nnx.state(lqer_model), nnx.state(ptq_model))
    np.testing.assert_array_equal(y, y_ptq)
  else:
    assert isinstance(kernel, lqer.WithLqer)
    assert kernel.a.shape == (2, 12, rank)
    assert kernel.b.shape == (2, rank, 12)
    assert_base_equal(kernel, ptq_model.layers.kernel)
    assert_no_worse(y, y_ptq, model(x))


@RANKS
def test_reshape_weight(rank):
  """ptq_test.test_reshape_weight: a flat stored weight reshaped for use."""

  class ReshapeDense(nn.Module):
    out_features: int

    @nn.compact
    def __call__(self, x):
      in_features = x.shape[-1]
      w = self.param(
        'w',
        nn.initializers.normal(),
        (in_features * self.out_features,),
        jnp.float32,
      )
      return jnp.dot(x, w.reshape(in_features, self.out_features))

  rank = rank and 2  # w is (4, 5)
  model = ReshapeDense(out_features=5)
  x = jax.random.normal(KEY, (3, 4))
  variables = model.init(KEY, x)
  assert variables['params']['w'].shape == (20,)

  lqer_model = qwix.quantize_model(
    model, LqerProvider(lqer_rules(rank, weight_qtype=jnp.int8))
  )
  abstract = jax.eval_shape(jax.jit(lqer_model.init), KEY, x)
  params = lqer_quantize_params(variables['params'], abstract['params'])
  assert isinstance(params['w'], ptq.WithAux)
  assert params['w'].array.shape == (4, 5)
  y = jax.jit(lqer_model.apply)({'params': params}, x)
  assert y.shape == (3, 5)

  ptq_model = qwix.quantize_model(
    model, qwix.PtqProvider(qwix_rules(weight_qtype=jnp.int8))
  )
  ptq_abs = jax.eval_shape(jax.jit(ptq_model.init), KEY, x)
  ptq_params = qwix.quantize_params(variables['params'], ptq_abs['params'])
  y_ptq = jax.jit(ptq_model.apply)({'params': ptq_params}, x)
  if rank is None:
    assert_trees_equal(params, ptq_params)
    np.testing.assert_array_equal(y, y_ptq)
  else:
    assert isinstance(params['w'], lqer.WithLqer)
    assert_base_equal(params['w'], ptq_params['w'])
    assert_no_worse(y, y_ptq, model.apply(variables, x))


@RANKS
def test_allow_extra_params(rank):
  """ptq_test.test_allow_extra_params: params the quantized methods never
  use (a loss head) raise, or are dropped with allow_extra_params."""

  class TestModel(nn.Module):
    def setup(self):
      self.dense_layer = nn.Dense(features=5)
      self.ssl_loss_layer = nn.Dense(features=1)

    def __call__(self, x):
      return self.dense_layer(x)

    def predict(self, x):
      return self(x)

    def compute_loss(self, x):
      return jnp.mean(self.ssl_loss_layer(self(x)))

  model = TestModel()
  x = jax.random.normal(KEY, (3, 4))
  variables = model.init(KEY, x, method='compute_loss')
  assert 'ssl_loss_layer' in variables['params']

  def abstract_of(provider):
    qmodel = qwix.quantize_model(model, provider, methods=['predict'])
    init_fn = jax.jit(lambda k, v: qmodel.init(k, v, method='predict'))
    return qmodel, jax.eval_shape(init_fn, KEY, x)

  rank = rank and 2
  lqer_model, abstract = abstract_of(
    LqerProvider(lqer_rules(rank, weight_qtype=jnp.int8))
  )
  with pytest.raises(ValueError, match='ssl_loss_layer'):
    lqer_quantize_params(variables, abstract, allow_extra_params=False)
  params = lqer_quantize_params(variables, abstract, allow_extra_params=True)
  assert 'ssl_loss_layer' not in params['params']
  y = lqer_model.apply(params, x, method='predict')

  ptq_model, ptq_abs = abstract_of(
    qwix.PtqProvider(qwix_rules(weight_qtype=jnp.int8))
  )
  ptq_params = qwix.quantize_params(variables, ptq_abs, allow_extra_params=True)
  y_ptq = ptq_model.apply(ptq_params, x, method='predict')
  if rank is None:
    assert_trees_equal(params, ptq_params)
    np.testing.assert_array_equal(y, y_ptq)
  else:
    assert isinstance(params['params']['dense_layer']['kernel'], lqer.WithLqer)
    assert_no_worse(y, y_ptq, model.apply(variables, x, method='predict'))


# ptq_test.test_asarray_*: LqerProvider inherits PtqProvider.asarray, and
# WithLqer is a WithAux; these check that neither loses anything (the
# factors of a WithLqer included).


def _asarray_model(provider_cls=LqerProvider):
  class AsArrayModule(nnx.Module):
    def __call__(self, x, dtype=None):
      return jnp.asarray(x, dtype=dtype)

  return qwix.quantize_model(
    AsArrayModule(),
    provider_cls(qwix_rules(weight_qtype=jnp.int8)),
    jnp.ones((2, 2)),
  )


def _with_lqer(array):
  how = qconfig.QuantizationRule(weight_qtype=jnp.int8).weight_qtype
  return lqer.WithLqer(
    array=array,
    how=how,
    a=jnp.ones((2, 1)),
    b=jnp.ones((1, 2)),
    contracting_axes=(0,),
  )


def test_asarray_interception_with_aux():
  """ptq_test.test_asarray_interception_with_aux, plus a WithLqer."""
  model = _asarray_model()
  how = qconfig.QuantizationRule(weight_qtype=jnp.int8).weight_qtype
  wa = ptq.WithAux(jnp.ones((2, 2)), how)
  assert jax.tree.map(id, model(wa)) == jax.tree.map(id, wa)
  res = model(ptq.WithAux([1.0, 2.0], how))
  assert isinstance(res.array, jax.Array)
  assert isinstance(res, ptq.WithAux)
  res = model(wa, dtype=jnp.float16)
  assert res.dtype == jnp.float16
  assert isinstance(res, ptq.WithAux)
  assert wa.shape == (2, 2)
  assert wa.ndim == 2
  assert wa.dtype == jnp.float32
  wa_partitioned = ptq.WithAux(
    nn.Partitioned(jnp.ones((2, 2)), names=('a', 'b')), how
  )
  cast = wa_partitioned.astype(jnp.float16)
  assert cast.dtype == jnp.float16
  assert isinstance(cast.array, nn.Partitioned)
  assert cast.array.names == ('a', 'b')
  # A WithLqer comes back whole: same type, same factors.
  wl = _with_lqer(jnp.ones((2, 2)))
  res = model(wl)
  assert isinstance(res, lqer.WithLqer)
  assert jax.tree.map(id, res) == jax.tree.map(id, wl)
  res = model(wl, dtype=jnp.float16)
  assert isinstance(res, lqer.WithLqer)
  assert res.dtype == jnp.float16
  assert res.a is wl.a and res.b is wl.b


def test_asarray_interception_qarray():
  """ptq_test.test_asarray_interception_qarray."""
  qa = qarray.QArray(jnp.ones((2, 2), jnp.int8), jnp.ones((1, 1)))
  assert jax.tree.map(id, _asarray_model()(qa)) == jax.tree.map(id, qa)


def test_asarray_interception_nnx_state():
  """ptq_test.test_asarray_interception_nnx_state."""
  model = _asarray_model()
  state = nnx.State({'value': jnp.ones(5)})
  assert isinstance(model(state.value), jax.Array)
  state_with_zp = nnx.State(
    {
      'array': nnx.State(
        {
          'qvalue': nnx.Variable(jnp.ones((2, 2), jnp.int8)),
          'scale': nnx.Variable(jnp.ones((1, 1))),
          'zero_point': nnx.Variable(jnp.ones((1, 1), jnp.int8)),
        }
      )
    }
  )
  res = model(state_with_zp)
  assert isinstance(res, qarray.QArray)
  assert res.zero_point is not None


@RANKS
def test_asarray_interception_linen_module(rank):
  """ptq_test.test_asarray_interception_linen_module (jnp.asarray(w) @ x),
  with params from lqer_quantize_params."""
  rank = rank and 1

  class LinenAsArrayModule(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param('w', nn.initializers.normal(), (2, 2))
      return jnp.asarray(w) @ x

  model = LinenAsArrayModule()
  x = jax.random.normal(KEY, (2, 2))
  variables = model.init(KEY, x)
  rules = lqer_rules(rank, weight_qtype=jnp.int8)
  q_model = qwix.quantize_model(model, LqerProvider(rules))
  q_vars = lqer_quantize_params(variables, jax.eval_shape(lambda: variables))
  assert q_model.apply(q_vars, x).shape == (2, 2)
  ptq_vars = qwix.quantize_params(variables, jax.eval_shape(lambda: variables))
  assert_trees_equal(q_vars, ptq_vars)
  np.testing.assert_array_equal(
    q_model.apply(q_vars, x),
    qwix.quantize_model(model, qwix.PtqProvider(rules)).apply(ptq_vars, x),
  )


def test_asarray_with_aux_qarray():
  """ptq_test.test_asarray_with_aux_qarray, plus a WithLqer of a QArray."""
  model = _asarray_model()
  qa = qarray.QArray(jnp.ones((2, 2), jnp.int8), jnp.ones((1, 1)))
  how = qconfig.QuantizationRule(weight_qtype=jnp.int8).weight_qtype
  res = model(ptq.WithAux(qa, how))
  assert isinstance(res, ptq.WithAux)
  assert isinstance(res.array, qarray.QArray)
  res = model(_with_lqer(qa))
  assert isinstance(res, lqer.WithLqer)
  assert isinstance(res.array, qarray.QArray)


def test_asarray_nnx_param_with_aux():
  """ptq_test.test_asarray_nnx_param_with_aux, plus a WithLqer."""
  model = _asarray_model()
  how = qconfig.QuantizationRule(weight_qtype=jnp.int8).weight_qtype
  assert isinstance(
    model(nnx.Param(ptq.WithAux(jnp.ones((2, 2)), how))), ptq.WithAux
  )
  assert isinstance(
    model(nnx.Param(_with_lqer(jnp.ones((2, 2))))), lqer.WithLqer
  )


@RANKS
def test_nnx_multi_head_attention_mxfp8(rank):
  """ptq_test.test_nnx_multi_head_attention: mxfp8, tile_size 32."""
  kw = dict(module_path='.*', weight_qtype='mxfp8', tile_size=32)
  x = jax.random.normal(KEY, (2, 16, 64))
  mha = nnx.MultiHeadAttention(
    num_heads=4,
    in_features=64,
    qkv_features=128,
    out_features=64,
    rngs=nnx.Rngs(0),
  )
  lqer_mha = qwix.quantize_model(
    mha, LqerProvider(lqer_rules(rank, **kw)), x, decode=False
  )
  y = lqer_mha(x, decode=False)
  assert y.shape == (2, 16, 64)

  ptq_mha = qwix.quantize_model(
    mha, qwix.PtqProvider(qwix_rules(**kw)), x, decode=False
  )
  y_ptq = ptq_mha(x, decode=False)
  if rank is None:
    assert_trees_equal(nnx.state(lqer_mha), nnx.state(ptq_mha))
    np.testing.assert_array_equal(y, y_ptq)
  else:
    for name in ('query', 'key', 'value', 'out'):
      kernel = getattr(lqer_mha, name).kernel
      assert isinstance(kernel, lqer.WithLqer), name
      assert_base_equal(kernel, getattr(ptq_mha, name).kernel)
    assert_no_worse(y, y_ptq, mha(x, decode=False))


@RANKS
def test_nnx_linear_2d_scales_ptq(rank):
  """ptq_test.test_nnx_linear_2d_scales_ptq: tile_size={0: 2, 1: 2}."""
  kw = dict(module_path='.*', weight_qtype=jnp.int8, tile_size={0: 2, 1: 2})
  layer = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
  x = jax.random.normal(KEY, (2, 8))
  lqer_layer = qwix.quantize_model(
    layer, LqerProvider(lqer_rules(rank, **kw)), x
  )
  y = lqer_layer(x)
  assert y.shape == (2, 16)
  assert lqer_layer.kernel.array.scale.shape == (4, 8)

  ptq_layer = qwix.quantize_model(layer, qwix.PtqProvider(qwix_rules(**kw)), x)
  y_ptq = ptq_layer(x)
  # The quantize_params flow too.
  abs_layer = nnx.eval_shape(
    lambda: qwix.quantize_model(layer, LqerProvider(lqer_rules(rank, **kw)), x)
  )
  quantized = lqer_quantize_params(nnx_params(layer), abs_layer)
  nnx.update(abs_layer, quantized)
  assert_trees_allclose(nnx.state(abs_layer), nnx.state(lqer_layer))
  if rank is None:
    assert_trees_equal(nnx.state(lqer_layer), nnx.state(ptq_layer))
    np.testing.assert_array_equal(y, y_ptq)
  else:
    assert isinstance(lqer_layer.kernel, lqer.WithLqer)
    assert_base_equal(lqer_layer.kernel, ptq_layer.kernel)
    assert_no_worse(y, y_ptq, layer(x))


@RANKS
def test_nnx_einsum_2d_scales_ptq(rank):
  """ptq_test.test_nnx_einsum_2d_scales_ptq: tile_size={0: 2, 1: 2}."""
  if not qwix_einsum_takes_dict_tiles():
    pytest.xfail(
      f'Qwix {qwix.__version__} einsum does not take dict tile'
      ' sizes (Qwix itself fails this test; fixed after 0.1.8)'
    )

  class EinsumModel(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jax.random.normal(KEY, (8, 16)))

    def __call__(self, x):
      return jnp.einsum('ij,jk->ik', x, self.w)

  kw = dict(module_path='.*', weight_qtype=jnp.int8, tile_size={0: 2, 1: 2})
  x = jax.random.normal(KEY, (2, 8))
  lqer_layer = qwix.quantize_model(
    EinsumModel(), LqerProvider(lqer_rules(rank, **kw)), x
  )
  y = lqer_layer(x)
  assert y.shape == (2, 16)
  assert lqer_layer.w.array.scale.shape == (4, 8)
  ptq_layer = qwix.quantize_model(
    EinsumModel(), qwix.PtqProvider(qwix_rules(**kw)), x
  )
  y_ptq = ptq_layer(x)
  if rank is None:
    assert_trees_equal(nnx.state(lqer_layer), nnx.state(ptq_layer))
    np.testing.assert_array_equal(y, y_ptq)
  else:
    assert isinstance(lqer_layer.w, lqer.WithLqer)
    assert_no_worse(y, y_ptq, EinsumModel()(x))


# =================================================== tests/contrib/gptq_test.py
# Calibration stays Qwix's (GptqCalibrationProvider takes GptqRules). Where
# the PTQ tree came from qwix.PtqProvider it comes from LqerProvider: with
# the same (rank-less) rules gptq.quantize_params gives the same params and
# the model the same outputs. With a rank, gptq.quantize_params on the LQER
# tree must refuse (it would replace the base under the factors), and
# lqer_quantize_params(fp, lqer_abstract, base=<GPTQ params>) refits the
# factors to GPTQ's base.
# Not ported: test_mixed_model_* (calibration only, no PTQ tree).


class _DenseModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(128)(x)
    x = nn.gelu(x)
    return nn.Dense(64)(x)


class _EinsumModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Einsum(shape=(x.shape[-1], 128), einsum_str='bi,io->bo')(x)
    x = nn.gelu(x)
    return nn.Einsum(shape=(128, 64), einsum_str='bi,io->bo')(x)


class _NnxDense(nnx.Module):
  def __init__(self, sizes=(32, 128, 64), *, rngs=None):
    rngs = rngs or nnx.Rngs(0)
    self.dense1 = nnx.Linear(sizes[0], sizes[1], rngs=rngs)
    self.dense2 = nnx.Linear(sizes[1], sizes[2], rngs=rngs)

  def __call__(self, x):
    return self.dense2(nn.gelu(self.dense1(x)))


class _NnxEinsum(nnx.Module):
  def __init__(self, *, rngs=None):
    rngs = rngs or nnx.Rngs(0)
    self.einsum1 = nnx.Einsum('bi,io->bo', (32, 128), rngs=rngs)
    self.einsum2 = nnx.Einsum('bi,io->bo', (128, 64), rngs=rngs)

  def __call__(self, x):
    return self.einsum2(nn.gelu(self.einsum1(x)))


def _gptq_calibrate_linen(model, rules, x, name, jit=False):
  """gptq_test's Linen calibration: two batches, stats accumulate."""
  variables = model.init(jax.random.key(1), x)
  provider = gptq.GptqCalibrationProvider(rules)

  def step(v, x):
    return qwix.quantize_model(model, provider).apply(
      v, x, mutable='quant_stats'
    )

  step = jax.jit(step) if jit else step
  _, new = step(variables, x)
  variables.update(new)
  stats = variables['quant_stats'][name]['kernel_gptq']
  assert stats['count'] == 1
  assert stats['sum_of_hessian'].shape == (32, 32)
  fp_y, new = step(variables, x)
  variables.update(new)
  assert variables['quant_stats'][name]['kernel_gptq']['count'] == 2
  return variables, fp_y


@pytest.mark.parametrize('kind', ['dense', 'einsum'])
def test_gptq_linen_with_lqer_provider_tree(kind):
  """gptq_test.test_dense_model_linen / test_einsum_model_linen, the PTQ
  tree and inference from LqerProvider (rank None)."""
  model, name = (
    (_DenseModel(), 'Dense_0')
    if kind == 'dense'
    else (_EinsumModel(), 'Einsum_0')
  )
  x = jax.random.normal(KEY, (5, 32))
  rules = [gptq.GptqRule(module_path=name, weight_qtype=jnp.int8)]
  variables, fp_y = _gptq_calibrate_linen(
    model, rules, x, name, jit=kind == 'einsum'
  )

  lqer_model = qwix.quantize_model(model, LqerProvider(rules))
  abs_params = jax.eval_shape(lqer_model.init, jax.random.key(2), x)['params']
  gptq_params = gptq.quantize_params(
    variables['params'], abs_params, variables['quant_stats']
  )
  gptq_y = lqer_model.apply({'params': gptq_params}, x)
  ptq_params = lqer_quantize_params(variables['params'], abs_params)
  ptq_y = lqer_model.apply({'params': ptq_params}, x)
  # GPTQ beats PTQ in output error.
  assert mae(fp_y, gptq_y) < mae(fp_y, ptq_y)

  # Bit-equal to the same flow with qwix.PtqProvider.
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  qwix_abs = jax.eval_shape(ptq_model.init, jax.random.key(2), x)['params']
  qwix_gptq = gptq.quantize_params(
    variables['params'], qwix_abs, variables['quant_stats']
  )
  assert_trees_equal(abs_params, qwix_abs)
  assert_trees_equal(gptq_params, qwix_gptq)
  assert_trees_equal(
    ptq_params, qwix.quantize_params(variables['params'], qwix_abs)
  )
  np.testing.assert_array_equal(
    gptq_y, ptq_model.apply({'params': qwix_gptq}, x)
  )
  np.testing.assert_array_equal(
    ptq_y, ptq_model.apply({'params': ptq_params}, x)
  )


@pytest.mark.parametrize('kind', ['dense', 'einsum'])
def test_gptq_linen_refit_lqer_on_gptq_base(kind):
  """GPTQ + LQER in Linen: gptq.quantize_params on an LQER tree with a rank
  raises; lqer_quantize_params(..., base=<GPTQ params>) keeps GPTQ's qvalue
  and beats GPTQ alone."""
  model, name = (
    (_DenseModel(), 'Dense_0')
    if kind == 'dense'
    else (_EinsumModel(), 'Einsum_0')
  )
  x = jax.random.normal(KEY, (5, 32))
  rules = [gptq.GptqRule(module_path=name, weight_qtype=jnp.int8)]
  variables, fp_y = _gptq_calibrate_linen(model, rules, x, name)
  params, stats = variables['params'], variables['quant_stats']

  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  ptq_abs = jax.eval_shape(ptq_model.init, jax.random.key(2), x)['params']
  gptq_params = gptq.quantize_params(params, ptq_abs, stats)
  gptq_y = ptq_model.apply({'params': gptq_params}, x)

  rank_rules = [LqerRule(module_path=name, weight_qtype=jnp.int8, rank=RANK)]
  lqer_model = qwix.quantize_model(model, LqerProvider(rank_rules))
  lqer_abs = jax.eval_shape(lqer_model.init, jax.random.key(2), x)['params']
  with pytest.raises(ValueError, match=BASE_REPLACED):
    gptq.quantize_params(params, lqer_abs, stats)

  refit = lqer_quantize_params(params, lqer_abs, base=gptq_params)
  kernel = refit[name]['kernel']
  assert isinstance(kernel, lqer.WithLqer)
  assert kernel.rank == RANK
  assert_base_equal(kernel, gptq_params[name]['kernel'])
  other = [k for k in params if k != name][0]
  assert_trees_equal(refit[other], gptq_params[other])
  y = lqer_model.apply({'params': refit}, x)
  assert mae(fp_y, y) < mae(fp_y, gptq_y)
  assert rel_err(y, fp_y) < rel_err(gptq_y, fp_y)


def _gptq_calibrate_nnx(model, rules, x, layer):
  model_cal = qwix.quantize_model(model, gptq.GptqCalibrationProvider(rules), x)
  model_cal(x)
  stats = (
    getattr(model_cal, layer).kernel_gptq if layer else (model_cal.kernel_gptq)
  )
  assert stats['count'] == 1
  assert stats['sum_of_hessian'].shape == (32, 32)
  fp_y = model_cal(x)
  stats = (
    getattr(model_cal, layer).kernel_gptq if layer else (model_cal.kernel_gptq)
  )
  assert stats['count'] == 2
  return (
    fp_y,
    nnx_params(model_cal),
    nnx.to_pure_dict(nnx.state(model_cal, flax_util.QuantStat)),
  )


@pytest.mark.parametrize('kind', ['dense', 'einsum', '2d_scales'])
def test_gptq_nnx_with_lqer_provider_model(kind):
  """gptq_test.test_dense_model_nnx / test_einsum_model_nnx /
  test_2d_scales, the PTQ model from LqerProvider (rank None)."""
  if kind == '2d_scales':
    model, layer = nnx.Linear(32, 64, rngs=nnx.Rngs(0)), None
    rules = [gptq.GptqRule(module_path='.*', tile_size={0: 2, 1: 2})]
  else:
    model, layer = (
      (_NnxDense(), 'dense1') if kind == 'dense' else (_NnxEinsum(), 'einsum1')
    )
    rules = [gptq.GptqRule(module_path=layer, weight_qtype=jnp.int8)]
  x = jax.random.normal(KEY, (5, 32))
  fp_y, state, quant_stats = _gptq_calibrate_nnx(model, rules, x, layer)

  model_lqer = qwix.quantize_model(model, LqerProvider(rules), x)
  ptq_y = model_lqer(x)
  gptq_params = gptq.quantize_params(state, model_lqer, quant_stats)
  nnx.update(model_lqer, gptq_params)
  gptq_y = model_lqer(x)
  assert mae(fp_y, gptq_y) <= mae(fp_y, ptq_y)

  model_ptq = qwix.quantize_model(model, qwix.PtqProvider(rules), x)
  np.testing.assert_array_equal(ptq_y, model_ptq(x))
  qwix_gptq = gptq.quantize_params(state, model_ptq, quant_stats)
  assert_trees_equal(gptq_params, qwix_gptq)
  nnx.update(model_ptq, qwix_gptq)
  np.testing.assert_array_equal(gptq_y, model_ptq(x))


@pytest.mark.parametrize('kind', ['dense', 'einsum'])
def test_gptq_nnx_refit_lqer_on_gptq_base(kind):
  """GPTQ + LQER in NNX: gptq.quantize_params on an LQER model with a rank
  raises; lqer_quantize_params(..., base=<GPTQ params>) keeps GPTQ's qvalue
  and beats GPTQ alone."""
  model, layer = (
    (_NnxDense(), 'dense1') if kind == 'dense' else (_NnxEinsum(), 'einsum1')
  )
  x = jax.random.normal(KEY, (5, 32))
  rules = [gptq.GptqRule(module_path=layer, weight_qtype=jnp.int8)]
  fp_y, state, quant_stats = _gptq_calibrate_nnx(model, rules, x, layer)

  model_ptq = qwix.quantize_model(model, qwix.PtqProvider(rules), x)
  gptq_params = gptq.quantize_params(state, model_ptq, quant_stats)
  nnx.update(model_ptq, gptq_params)
  gptq_y = model_ptq(x)

  rank_rules = [LqerRule(module_path=layer, weight_qtype=jnp.int8, rank=RANK)]
  model_lqer = qwix.quantize_model(model, LqerProvider(rank_rules), x)
  with pytest.raises(ValueError, match=BASE_REPLACED):
    gptq.quantize_params(state, model_lqer, quant_stats)
  abs_lqer = nnx.eval_shape(
    lambda: qwix.quantize_model(model, LqerProvider(rank_rules), x)
  )
  with pytest.raises(ValueError, match=BASE_REPLACED):
    gptq.quantize_params(state, abs_lqer, quant_stats)

  refit = lqer_quantize_params(state, model_lqer, base=gptq_params)
  nnx.update(model_lqer, refit)
  kernel = getattr(model_lqer, layer).kernel
  assert isinstance(kernel, lqer.WithLqer)
  assert kernel.rank == RANK
  assert_base_equal(kernel, getattr(model_ptq, layer).kernel)
  y = model_lqer(x)
  assert mae(fp_y, y) < mae(fp_y, gptq_y)
  assert rel_err(y, fp_y) < rel_err(gptq_y, fp_y)
  # The abstract model takes the same refit params.
  nnx.update(abs_lqer, lqer_quantize_params(state, abs_lqer, base=gptq_params))
  np.testing.assert_allclose(abs_lqer(x), y, rtol=1e-5, atol=1e-6)


def test_qwix_quantize_params_on_lqer_tree_with_rank_raises():
  """The same hazard without calibration: qwix.quantize_params on an LQER
  tree with a rank would keep abstract (never fitted) factors."""
  x = jax.random.normal(KEY, (5, 32))
  model = _DenseModel()
  params = model.init(KEY, x)['params']
  lqer_model = qwix.quantize_model(
    model, LqerProvider(lqer_rules(RANK, weight_qtype=jnp.int8))
  )
  lqer_abs = jax.eval_shape(lqer_model.init, KEY, x)['params']
  with pytest.raises(ValueError, match=BASE_REPLACED):
    qwix.quantize_params(params, lqer_abs)


# ==================================================== tests/contrib/awq_test.py
# AWQ's flows take the PTQ tree from LqerProvider (rank None) and give the
# same params; plain PTQ baselines run under LqerProvider. With a rank,
# lqer_quantize_params(fp, lqer_abstract, base=<AWQ params>) refits the
# factors to AWQ's base (qvalue and per-channel scale kept).
# Not ported: test_multiple_calibration_batches, test_mixed_model_*
# (calibration only, no PTQ tree); test_multi_layer_model and
# test_awq_outperforms_ptq (the flows of test_partial_quantization and
# test_dense_model_linen on more layers / other data; cut for runtime).


def _awq_flow(model, rules, x):
  """Calibrate, then AWQ params from the LqerProvider tree and the Qwix
  tree; returns (variables, lqer abstract, awq params, fp_y)."""
  variables = model.init(jax.random.key(1), x)
  model_cal = qwix.quantize_model(model, awq.AwqCalibrationProvider(rules))
  fp_y, new = model_cal.apply(variables, x, mutable='quant_stats')
  variables.update(new)
  lqer_model = qwix.quantize_model(model, LqerProvider(rules))
  abs_params = jax.eval_shape(lqer_model.init, jax.random.key(2), x)['params']
  awq_params = awq.quantize_params(
    variables['params'], abs_params, variables['quant_stats']
  )
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  qwix_abs = jax.eval_shape(ptq_model.init, jax.random.key(2), x)['params']
  assert_trees_equal(abs_params, qwix_abs)
  assert_trees_equal(
    awq_params,
    awq.quantize_params(
      variables['params'], qwix_abs, variables['quant_stats']
    ),
  )
  return variables, abs_params, awq_params, fp_y


def test_awq_dense_model_linen_and_lqer_refit_on_awq_base():
  """awq_test.test_dense_model_linen (int4 / tile 64, a salient input
  channel; also stands for test_awq_outperforms_ptq, the same flow on
  heavy-tailed inputs): AWQ from LqerProvider's tree beats PTQ under
  LqerProvider; then LQER refitted on AWQ's base (qvalue and per-channel
  scale kept) beats AWQ alone."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.gelu(nn.Dense(256)(x))
      return nn.Dense(128)(x)

  model = Model()
  x = jax.random.normal(KEY, (10, 128)) * jnp.ones(128).at[0].set(100.0)
  rules = [
    awq.AwqRule(module_path='Dense_0', weight_qtype=jnp.int4, tile_size=64)
  ]
  variables, abs_params, awq_params, fp_y = _awq_flow(model, rules, x)
  stats = variables['quant_stats']['Dense_0']['kernel_awq']
  assert stats['count'] == 1
  assert stats['sum_of_act_scale'].shape == (128,)
  assert isinstance(awq_params['Dense_0']['kernel'], awq.WithAwqScale)
  awq_y = qwix.quantize_model(model, awq.AwqInferenceProvider(rules)).apply(
    {'params': awq_params}, x
  )
  assert awq_y.shape == fp_y.shape
  assert jnp.all(jnp.isfinite(awq_y))
  lqer_model = qwix.quantize_model(model, LqerProvider(rules))
  ptq_params = lqer_quantize_params(variables['params'], abs_params)
  ptq_y = lqer_model.apply({'params': ptq_params}, x)
  assert mae(fp_y, awq_y) < mae(fp_y, ptq_y)
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  qwix_ptq = qwix.quantize_params(variables['params'], abs_params)
  assert_trees_equal(ptq_params, qwix_ptq)
  np.testing.assert_array_equal(ptq_y, ptq_model.apply({'params': qwix_ptq}, x))

  rank_rules = [
    LqerRule(
      module_path='Dense_0', weight_qtype=jnp.int4, tile_size=64, rank=RANK
    )
  ]
  rank_model = qwix.quantize_model(model, LqerProvider(rank_rules))
  rank_abs = jax.eval_shape(rank_model.init, KEY, x)['params']
  refit = lqer_quantize_params(variables['params'], rank_abs, base=awq_params)
  kernel = refit['Dense_0']['kernel']
  assert isinstance(kernel, lqer.WithLqer)
  assert kernel.rank == RANK
  assert_base_equal(kernel, awq_params['Dense_0']['kernel'])
  np.testing.assert_array_equal(
    kernel.input_scale, awq_params['Dense_0']['kernel'].awq_scale
  )
  assert_trees_equal(refit['Dense_1'], awq_params['Dense_1'])
  y = rank_model.apply({'params': refit}, x)
  assert mae(fp_y, y) < mae(fp_y, awq_y)
  assert rel_err(y, fp_y) < rel_err(awq_y, fp_y)


@pytest.mark.parametrize(
  'case', ['int8', 'int4', 'partial', 'einsum', '2d_scales']
)
def test_awq_flows_with_lqer_provider_tree(case):
  """awq_test.test_different_qtypes / test_partial_quantization /
  test_einsum_model_linen / test_2d_scales."""
  if case in ('int8', 'int4', '2d_scales'):

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(128)(x)  # Qwix: 64; 128 shares AWQ's compilations

    x = jax.random.normal(KEY, (5, 32))
    tile = {0: 2, 1: 2} if case == '2d_scales' else None
    rules = [
      awq.AwqRule(
        weight_qtype=jnp.int4 if case == 'int4' else jnp.int8, tile_size=tile
      )
    ]
    out_shape = (5, 128)
  elif case == 'partial':

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Dense(128, name='dense1')(x))
        return nn.Dense(64, name='dense2')(x)

    x = jax.random.normal(KEY, (5, 32))
    rules = [awq.AwqRule(module_path='dense1', weight_qtype=jnp.int8)]
    out_shape = (5, 64)
  else:
    Model = _EinsumModel  # pylint: disable=invalid-name
    x = jax.random.normal(KEY, (5, 32)) * jnp.ones(32).at[0].set(100.0)
    rules = [awq.AwqRule(module_path='Einsum_0', weight_qtype=jnp.int8)]
    out_shape = (5, 64)

  model = Model()
  variables, abs_params, awq_params, fp_y = _awq_flow(model, rules, x)
  assert awq_params is not None
  if case == 'partial':
    assert 'kernel_awq' in variables['quant_stats']['dense1']
    assert 'dense2' not in variables['quant_stats']
  awq_y = qwix.quantize_model(model, awq.AwqInferenceProvider(rules)).apply(
    {'params': awq_params}, x
  )
  assert awq_y.shape == out_shape
  lqer_model = qwix.quantize_model(model, LqerProvider(rules))
  ptq_params = lqer_quantize_params(variables['params'], abs_params)
  ptq_y = lqer_model.apply({'params': ptq_params}, x)
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  np.testing.assert_array_equal(
    ptq_y,
    ptq_model.apply(
      {'params': qwix.quantize_params(variables['params'], abs_params)}, x
    ),
  )
  if case == 'einsum':
    assert mae(fp_y, awq_y) < mae(fp_y, ptq_y)
  if case == '2d_scales':
    assert mae(fp_y, awq_y) <= mae(fp_y, ptq_y)


# =========================================== tests/contrib/smooth_quant_test.py
# SQ's flows take the PTQ tree from LqerProvider (rank None); the PTQ
# baseline runs under LqerProvider, and with a rank LQER (weights and
# activations int4, like SQ) is no worse than that baseline.
# Not ported: test_multiple_calibration_batches (calibration only),
# test_multi_layer_model (test_partial_quantization's flow on more layers;
# cut for runtime).


class _SqModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(256)(x))
    return nn.Dense(128)(x)


@RANKS
def test_sq_dense_model_linen(rank):
  """smooth_quant_test.test_dense_model_linen: int4 weights and
  activations, tile 64, a salient input channel."""
  model = _SqModel()
  x = jax.random.normal(KEY, (10, 128)) * jnp.ones(128).at[0].set(100.0)
  variables = model.init(jax.random.key(1), x)
  kw = dict(
    module_path='Dense_0',
    weight_qtype=jnp.int4,
    act_qtype=jnp.int4,
    tile_size=64,
  )
  rules = [sq.SqRule(**kw)]
  model_cal = qwix.quantize_model(model, sq.SqCalibrationProvider(rules))
  _, new = model_cal.apply(variables, x, mutable='quant_stats')
  variables.update(new)
  stats = variables['quant_stats']['Dense_0']['kernel_sq']
  assert stats['count'] == 1
  assert stats['sum_of_sq_scale'].shape == (128,)
  fp_y, new = model_cal.apply(variables, x, mutable='quant_stats')
  variables.update(new)
  assert variables['quant_stats']['Dense_0']['kernel_sq']['count'] == 2

  lqer_sq_model = qwix.quantize_model(model, LqerProvider(rules))
  abs_params = jax.eval_shape(lqer_sq_model.init, jax.random.key(2), x)[
    'params'
  ]
  sq_params = sq.quantize_params(
    variables['params'], abs_params, variables['quant_stats']
  )
  assert isinstance(sq_params['Dense_0']['kernel'], sq.WithSqScale)
  sq_y = qwix.quantize_model(model, sq.SqInferenceProvider(rules)).apply(
    {'params': sq_params}, x
  )
  assert sq_y.shape == fp_y.shape
  assert jnp.all(jnp.isfinite(sq_y))

  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  qwix_abs = jax.eval_shape(ptq_model.init, jax.random.key(2), x)['params']
  qwix_ptq = qwix.quantize_params(variables['params'], qwix_abs)
  qwix_ptq_y = ptq_model.apply({'params': qwix_ptq}, x)
  if rank is None:
    assert_trees_equal(abs_params, qwix_abs)
    assert_trees_equal(
      sq_params,
      sq.quantize_params(
        variables['params'], qwix_abs, variables['quant_stats']
      ),
    )
    ptq_params = lqer_quantize_params(variables['params'], abs_params)
    ptq_y = lqer_sq_model.apply({'params': ptq_params}, x)
    assert_trees_equal(ptq_params, qwix_ptq)
    np.testing.assert_array_equal(ptq_y, qwix_ptq_y)
    # SQ beats PTQ.
    assert mae(fp_y, sq_y) < mae(fp_y, ptq_y)
  else:
    lqer_model = qwix.quantize_model(
      model, LqerProvider(lqer_rules(rank, **kw))
    )
    lqer_abs = jax.eval_shape(lqer_model.init, KEY, x)['params']
    lqer_params = lqer_quantize_params(variables['params'], lqer_abs)
    assert isinstance(lqer_params['Dense_0']['kernel'], lqer.WithLqer)
    assert_base_equal(
      lqer_params['Dense_0']['kernel'], qwix_ptq['Dense_0']['kernel']
    )
    y = lqer_model.apply({'params': lqer_params}, x)
    assert_no_worse(y, qwix_ptq_y, fp_y)


def test_sq_dense_model_nnx():
  """smooth_quant_test.test_dense_model_nnx, PTQ model from LqerProvider."""

  model = _NnxDense((128, 256, 128))
  x = jax.random.normal(KEY, (10, 128)) * jnp.ones(128).at[0].set(100.0)
  rules = [sq.SqRule(weight_qtype=jnp.int4, act_qtype=jnp.int4, tile_size=64)]
  model_cal = qwix.quantize_model(model, sq.SqCalibrationProvider(rules), x)
  model_cal(x)
  assert model_cal.dense1.kernel_sq['count'] == 1
  assert model_cal.dense1.kernel_sq['sum_of_sq_scale'].shape == (128,)
  fp_y = model_cal(x)
  assert model_cal.dense1.kernel_sq['count'] == 2

  model_ptq = qwix.quantize_model(model, LqerProvider(rules), x)
  state = nnx_params(model_cal)

  def extract(v):
    if isinstance(v, flax_util.QuantStat):
      return v
    return v.get_value() if isinstance(v, nnx.Variable) else v

  quant_stats = nnx.to_pure_dict(
    nnx.state(model_cal, flax_util.QuantStat), extract_fn=extract
  )
  sq_params = sq.quantize_params(state, model_ptq, quant_stats)
  assert isinstance(sq_params['dense1']['kernel'], sq.WithSqScale)
  sq_y = qwix.quantize_model(model, sq.SqInferenceProvider(rules), x)(x)
  assert sq_y.shape == fp_y.shape
  assert jnp.all(jnp.isfinite(sq_y))
  ptq_y = model_ptq(x)
  assert mae(fp_y, sq_y) <= mae(fp_y, ptq_y)

  qwix_ptq = qwix.quantize_model(model, qwix.PtqProvider(rules), x)
  np.testing.assert_array_equal(ptq_y, qwix_ptq(x))
  assert_trees_equal(
    sq_params, sq.quantize_params(state, qwix_ptq, quant_stats)
  )


@pytest.mark.parametrize('case', ['int8', 'int4', 'partial'])
def test_sq_flows_with_lqer_provider_tree(case):
  """smooth_quant_test.test_different_qtypes /
  test_partial_quantization."""
  if case == 'partial':

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Dense(128, name='dense1')(x))
        return nn.Dense(64, name='dense2')(x)

    x, out_shape = jax.random.normal(KEY, (5, 32)), (5, 64)
    rules = [
      sq.SqRule(module_path='dense1', weight_qtype=jnp.int8, act_qtype=jnp.int8)
    ]
  else:

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(64)(x)

    x, out_shape = jax.random.normal(KEY, (5, 32)), (5, 64)
    qtype = jnp.int4 if case == 'int4' else jnp.int8
    rules = [sq.SqRule(weight_qtype=qtype, act_qtype=qtype)]

  model = Model()
  variables = model.init(jax.random.key(1), x)
  model_cal = qwix.quantize_model(model, sq.SqCalibrationProvider(rules))
  _, new = model_cal.apply(variables, x, mutable='quant_stats')
  variables.update(new)
  if case == 'partial':
    assert 'kernel_sq' in variables['quant_stats']['dense1']
    assert 'dense2' not in variables['quant_stats']
  lqer_model = qwix.quantize_model(model, LqerProvider(rules))
  abs_params = jax.eval_shape(lqer_model.init, jax.random.key(2), x)['params']
  sq_params = sq.quantize_params(
    variables['params'], abs_params, variables['quant_stats']
  )
  assert sq_params is not None
  sq_y = qwix.quantize_model(model, sq.SqInferenceProvider(rules)).apply(
    {'params': sq_params}, x
  )
  assert sq_y.shape == out_shape
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  qwix_abs = jax.eval_shape(ptq_model.init, jax.random.key(2), x)['params']
  assert_trees_equal(
    sq_params,
    sq.quantize_params(variables['params'], qwix_abs, variables['quant_stats']),
  )


# ============================================= tests/contrib/padded_ptq_test.py
# The reference side of these tests (PTQ on the explicitly padded weight)
# runs under LqerProvider; small shapes (D not a multiple of the tile).
# test_einsum_simple_2d_scales needs dict tiles in Qwix's einsum (as
# test_nnx_einsum_2d_scales_ptq).

_T, _E, _D, _F = 4, 2, 72, 24


class _PadModel(nn.Module):
  e: int
  d: int
  f: int
  w_init: jax.Array
  op: str

  @nn.compact
  def __call__(self, x):
    w = self.param('w', lambda *_: self.w_init, (self.e, self.d, self.f))
    if self.op == 'einsum':
      return jnp.einsum('td,edf->tef', x, w)
    return jax.lax.dot_general(x, w, (([1], [1]), ([], [])))


@pytest.mark.parametrize(
  'op,act_qtype,tile_size,rank',
  [
    ('einsum', None, 32, None),
    ('einsum', None, 32, RANK),
    ('dot_general', 'float8_e4m3fn', 256, None),
  ],
)
def test_padded_ptq_matches_lqer_on_padded_weight(
  op, act_qtype, tile_size, rank
):
  """padded_ptq_test.test_einsum_simple / test_dot_general_simple: padded
  PTQ of W equals PTQ of the zero-padded W, here run under LqerProvider."""
  d_padded = ((_D + tile_size - 1) // tile_size) * tile_size
  x = jax.random.normal(KEY, (_T, _D), dtype=jnp.float32)
  w = jax.random.normal(jax.random.key(1), (_E, _D, _F), dtype=jnp.float32)
  w_padded = jnp.pad(w, ((0, 0), (0, d_padded - _D), (0, 0)))
  x_padded = jnp.pad(x, ((0, 0), (0, d_padded - _D)))
  kw = dict(
    module_path='.*',
    weight_qtype='float4_e2m1fn',
    act_qtype=act_qtype,
    tile_size=tile_size,
  )
  rule = qconfig.QuantizationRule(**kw)
  if op == 'einsum':
    how = core_einsum.get_how_to_quantize(
      einsum_str='td,edf->tef',
      ndims=(2, 3),
      for_lhs=False,
      qtype=rule.weight_qtype,
      tile_size=tile_size,
      calibration_method='absmax',
    )
  else:
    how = core_dot.get_how_to_quantize(
      dimension_numbers=(([1], [1]), ([], [])),
      ndims=(2, 3),
      for_lhs=False,
      qtype=rule.weight_qtype,
      tile_size=tile_size,
      calibration_method='absmax',
    )
  w_pad = padded_ptq.quantize_act(w, how, rule, None)
  w_ptq = ptq.quantize_act(w_padded, how, rule, None)
  assert jnp.allclose(
    w_pad.qvalue[:, :_D, :], w_ptq.qvalue[:, :_D, :], atol=1e-6
  )
  assert jnp.allclose(w_pad.scale, w_ptq.scale, atol=1e-6)

  pad_qmodel = qwix.quantize_model(
    _PadModel(_E, _D, _F, w, op), padded_ptq.PaddedPtqProvider([rule])
  )
  result_pad = pad_qmodel.apply(pad_qmodel.init(KEY, x), x)
  padded_model = _PadModel(_E, d_padded, _F, w_padded, op)
  lqer_qmodel = qwix.quantize_model(
    padded_model, LqerProvider(lqer_rules(rank, **kw))
  )
  lqer_vars = lqer_qmodel.init(jax.random.key(1), x_padded)
  result_lqer = lqer_qmodel.apply(lqer_vars, x_padded)

  base_qmodel = qwix.quantize_model(padded_model, qwix.PtqProvider([rule]))
  base_vars = base_qmodel.init(jax.random.key(1), x_padded)
  result_ptq = base_qmodel.apply(base_vars, x_padded)
  assert jnp.allclose(result_pad, result_ptq, atol=1e-3)
  if rank is None:
    assert_trees_equal(lqer_vars, base_vars)
    if op == 'einsum':
      assert_einsum_outputs_match(result_lqer, result_ptq)
    else:
      np.testing.assert_array_equal(result_lqer, result_ptq)
    assert jnp.allclose(result_pad, result_lqer, atol=1e-3)
  else:
    assert isinstance(lqer_vars['params']['w'], lqer.WithLqer)
    assert_base_equal(lqer_vars['params']['w'], base_vars['params']['w'])
    fp = padded_model.apply(padded_model.init(KEY, x_padded), x_padded)
    assert_no_worse(result_lqer, result_ptq, fp)


def test_padded_ptq_einsum_2d_scales():
  """padded_ptq_test.test_einsum_simple_2d_scales, LqerProvider reference."""
  if not qwix_einsum_takes_dict_tiles():
    pytest.xfail(
      f'Qwix {qwix.__version__} einsum does not take dict tile'
      ' sizes (Qwix itself fails this test; fixed after 0.1.8)'
    )
  tile_size = {0: 2, 1: 2}
  x = jax.random.normal(KEY, (_T, _D), dtype=jnp.float32)
  w = jax.random.normal(jax.random.key(1), (_E, _D, _F), dtype=jnp.float32)
  e_p, d_p, f_p = padded_ptq.get_padded_shape(w.shape, tile_size)
  w_padded = padded_ptq.pad_to_shape(w, (e_p, d_p, f_p))
  x_padded = padded_ptq.pad_to_shape(x, (_T, d_p))
  kw = dict(
    module_path='.*', weight_qtype='int8', act_qtype='int8', tile_size=tile_size
  )
  rule = qconfig.QuantizationRule(**kw)
  pad_qmodel = qwix.quantize_model(
    _PadModel(_E, _D, _F, w, 'einsum'), padded_ptq.PaddedPtqProvider([rule])
  )
  result_pad = pad_qmodel.apply(pad_qmodel.init(KEY, x), x)
  lqer_qmodel = qwix.quantize_model(
    _PadModel(e_p, d_p, f_p, w_padded, 'einsum'),
    LqerProvider(lqer_rules(None, **kw)),
  )
  result = lqer_qmodel.apply(lqer_qmodel.init(KEY, x_padded), x_padded)
  assert jnp.allclose(result_pad, result, atol=1e-3)


# ============================================ tests/contrib/calibration_test.py
# quantize_params_with_calibration (the framework under GPTQ / QEP / AWQ)
# on an LqerProvider tree (rank None) gives what it gives on Qwix's.
# Not ported: NormalizeWeightTest (a Qwix reshape utility lqer doesn't use
# through the provider).


@pytest.fixture(scope='module')
def gptq_calibrated_dense():
  model = _DenseModel()
  x = jax.random.normal(KEY, (5, 32))
  variables = model.init(jax.random.key(1), x)
  rules = [gptq.GptqRule(module_path='Dense_0', weight_qtype=jnp.int8)]
  cal = qwix.quantize_model(model, gptq.GptqCalibrationProvider(rules))
  _, new = cal.apply(variables, x, mutable='quant_stats')
  variables.update(new)
  lqer_model = qwix.quantize_model(model, LqerProvider(rules))
  abs_vars = jax.eval_shape(lqer_model.init, jax.random.key(2), x)
  qwix_abs = jax.eval_shape(
    qwix.quantize_model(model, qwix.PtqProvider(rules)).init,
    jax.random.key(2),
    x,
  )
  return lqer_model, x, variables, abs_vars, qwix_abs


def _mock_ptq(ctx):
  w = qarray.quantize(ctx.weight, ctx.how)
  return ctx.abs_w.replace(array=ctx.restore_shape(w))


def test_calibration_delegates_to_quantize_fn(gptq_calibrated_dense):
  """calibration_test.test_delegates_to_quantize_fn and
  test_ptq_fallback_for_unmatched_params."""
  lqer_model, x, variables, abs_vars, qwix_abs = gptq_calibrated_dense
  contexts = []

  def quantize(ctx):
    contexts.append(ctx)
    return _mock_ptq(ctx)

  result = qwix_calibration.quantize_params_with_calibration(
    variables['params'],
    abs_vars['params'],
    variables['quant_stats'],
    '_gptq',
    quantize,
  )
  assert len(contexts) == 1  # Dense_0's kernel; Dense_1 falls back to PTQ
  ctx = contexts[0]
  assert ctx.weight.ndim == 2
  assert 'hessian' in ctx.calibration_stats
  assert ctx.path[-1] == 'kernel'
  assert lqer_model.apply({'params': result}, x).shape == (5, 64)
  assert_trees_equal(
    result,
    qwix_calibration.quantize_params_with_calibration(
      variables['params'],
      qwix_abs['params'],
      variables['quant_stats'],
      '_gptq',
      _mock_ptq,
    ),
  )


def test_calibration_matches_gptq_quantize_params(gptq_calibrated_dense):
  """calibration_test.test_matches_gptq_quantize_params."""
  lqer_model, x, variables, abs_vars, _ = gptq_calibrated_dense

  def gptq_quantize(ctx):
    w = gptq_core.quantize_weight(
      ctx.weight,
      ctx.calibration_stats['hessian'],
      ctx.how,
      blocksize=128,
      percdamp=0.01,
    )[0]
    return ctx.abs_w.replace(array=ctx.restore_shape(w))

  shared = qwix_calibration.quantize_params_with_calibration(
    variables['params'],
    abs_vars['params'],
    variables['quant_stats'],
    '_gptq',
    gptq_quantize,
  )
  direct = gptq.quantize_params(
    variables['params'], abs_vars['params'], variables['quant_stats']
  )
  assert jnp.allclose(
    lqer_model.apply({'params': shared}, x),
    lqer_model.apply({'params': direct}, x),
  )


def test_calibration_nnx_returns_pure_dict():
  """calibration_test.test_nnx_returns_pure_dict, LqerProvider abstract."""
  rules = [gptq.GptqRule(weight_qtype=jnp.int8)]
  x = jax.random.normal(KEY, (4, 12))
  model = nnx.Linear(in_features=12, out_features=6, rngs=nnx.Rngs(0))
  abs_model = nnx.eval_shape(
    lambda: qwix.quantize_model(model, LqerProvider(rules), x)
  )
  hessian = jnp.eye(12)
  aggregator = averaging.SimpleMovingAverage()
  quant_stats = {
    'kernel_gptq': aggregator.update(
      aggregator.init({'hessian': hessian}), {'hessian': hessian}
    )
  }
  result = qwix_calibration.quantize_params_with_calibration(
    nnx_params(model), abs_model, quant_stats, '_gptq', _mock_ptq
  )
  assert isinstance(result, dict)
  nnx.update(abs_model, result)
  assert abs_model(x).shape == (4, 6)
  qwix_model = qwix.quantize_model(model, qwix.PtqProvider(rules), x)
  nnx.update(qwix_model, result)
  np.testing.assert_array_equal(abs_model(x), qwix_model(x))


# ==================================================== tests/contrib/qep_test.py
# qep.quantize builds its own PtqProvider model; its params run under
# LqerProvider unchanged, qep.quantize_params takes LqerProvider's tree, and
# LQER refitted on QEP's base beats QEP alone.
# Not ported: test_exact_stagewise_matches_manual_two_stage_reference,
# test_infers_shared_input_branch_stage, test_no_matching_layers_raises,
# test_non_reiterable_input_raises (QEP's own staging and argument checks;
# no PTQ tree or provider a user would swap).


class _QepDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(128, name='Dense_0')(x))
    return nn.Dense(64, name='Dense_1')(x)


def test_qep_single_layer_beats_ptq_and_lqer_refit_beats_qep():
  """qep_test.test_single_layer_qep_beats_ptq_and_matches_gptq, with the
  PTQ model from LqerProvider, then LQER refitted on QEP's base."""
  model = _QepDense()
  x = jax.random.normal(KEY, (8, 32))
  variables = model.init(jax.random.key(1), x)
  fp_y = model.apply(variables, x)
  rules = [qep.QepRule(module_path='Dense_0', weight_qtype=jnp.int8)]
  result = qep.quantize(model, [x], rules, variables=variables)
  qep_y = result.model.apply({'params': result.params}, x)

  lqer_model = qwix.quantize_model(model, LqerProvider(rules))
  np.testing.assert_array_equal(
    lqer_model.apply({'params': result.params}, x), qep_y
  )
  abs_params = jax.eval_shape(lqer_model.init, KEY, x)['params']
  ptq_params = lqer_quantize_params(variables['params'], abs_params)
  ptq_y = lqer_model.apply({'params': ptq_params}, x)
  gptq_rules = [gptq.GptqRule(module_path='Dense_0', weight_qtype=jnp.int8)]
  _, gptq_vars = qwix.quantize_model(
    model, gptq.GptqCalibrationProvider(gptq_rules)
  ).apply(variables, x, mutable='quant_stats')
  gptq_params = gptq.quantize_params(
    variables['params'], abs_params, gptq_vars['quant_stats']
  )
  gptq_y = lqer_model.apply({'params': gptq_params}, x)
  assert mae(fp_y, qep_y) < mae(fp_y, ptq_y)
  assert mae(fp_y, qep_y) <= mae(fp_y, gptq_y) * 1.1

  rank_rules = [
    LqerRule(module_path='Dense_0', weight_qtype=jnp.int8, rank=RANK)
  ]
  rank_model = qwix.quantize_model(model, LqerProvider(rank_rules))
  rank_abs = jax.eval_shape(rank_model.init, KEY, x)['params']
  refit = lqer_quantize_params(
    variables['params'], rank_abs, base=result.params
  )
  assert isinstance(refit['Dense_0']['kernel'], lqer.WithLqer)
  assert_base_equal(
    refit['Dense_0']['kernel'], result.params['Dense_0']['kernel']
  )
  y = rank_model.apply({'params': refit}, x)
  assert mae(fp_y, y) < mae(fp_y, qep_y)


def test_qep_quantize_params_without_correction_on_lqer_tree():
  """qep_test.test_quantize_params_without_correction_does_not_require_
  hessian_delta, with LqerProvider's tree."""
  model = _QepDense()
  x = jax.random.normal(KEY, (4, 32))
  variables = model.init(jax.random.key(11), x)
  rules = [qep.QepRule(module_path='Dense_0', weight_qtype=jnp.int8)]
  lqer_model = qwix.quantize_model(model, LqerProvider(rules))
  abs_params = jax.eval_shape(lqer_model.init, KEY, x)['params']
  hessian = jnp.eye(32)
  aggregator = averaging.SimpleMovingAverage()
  quant_stat = aggregator.update(
    aggregator.init({'hessian': hessian}), {'hessian': hessian}
  )
  stats = {'Dense_0': {'kernel_qep': quant_stat}}
  params = qep.quantize_params(
    variables['params'], abs_params, stats, apply_correction=False
  )
  y = lqer_model.apply({'params': params}, x)
  assert y.shape == (4, 64)
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  qwix_abs = jax.eval_shape(ptq_model.init, KEY, x)['params']
  qwix_params = qep.quantize_params(
    variables['params'], qwix_abs, stats, apply_correction=False
  )
  assert_trees_equal(params, qwix_params)
  np.testing.assert_array_equal(y, ptq_model.apply({'params': qwix_params}, x))


# ===================================== tests/_src/utils/checkpoint_util_test.py
# process_prequantized_params with an LqerProvider template: rank None as
# Qwix's PTQ template, and an LQER payload (the factors are plain arrays)
# into an LQER template with a rank. lqer.checkpoints.tree refuses to load an
# LQER
# checkpoint into a plain Qwix template and the reverse.
# Not ported: PrequantizedQtTest (QtProvider templates), the
# Linen-template TypeError, list / param-with-array-attribute payloads and
# the sharding-placement cases on QT templates (checkpoint_util internals
# with no PTQ template to swap).


def _to_orbax_payload(tree):
  if isinstance(tree, dict):
    return {k: _to_orbax_payload(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_to_orbax_payload(v) for v in tree)
  return (
    np.asarray(jax.device_get(tree)) if isinstance(tree, jax.Array) else tree
  )


def _linear_reference(rules, x, provider=LqerProvider):
  fp_linear = nnx.Linear(
    in_features=x.shape[-1], out_features=6, rngs=nnx.Rngs(0)
  )
  abs_linear = nnx.eval_shape(
    lambda: qwix.quantize_model(fp_linear, provider(rules), x)
  )
  orig = nnx_params(fp_linear)
  quantize = (
    lqer_quantize_params if provider is LqerProvider else qwix.quantize_params
  )
  return fp_linear, abs_linear, orig, quantize(orig, abs_linear)


@pytest.mark.parametrize('calibration_method', ['absmax', 'minmax'])
@RANKS
def test_process_prequantized_params_nnx(calibration_method, rank):
  """checkpoint_util_test.test_process_prequantized_params_nnx and
  _nnx_asymmetric."""
  kw = dict(
    module_path='.*',
    weight_qtype=jnp.int8,
    weight_calibration_method=calibration_method,
  )
  if calibration_method == 'absmax':
    kw['tile_size'] = 4
  x = jax.random.normal(KEY, (10, 12))
  fp_linear, abs_linear, orig, reference = _linear_reference(
    lqer_rules(rank, **kw), x
  )
  assert ('zero_point' in reference['kernel']['array']) == (
    calibration_method == 'minmax'
  )
  processed = checkpoint_util.process_prequantized_params(
    _to_orbax_payload(reference), abs_linear
  )
  assert jnp.allclose(processed['bias'], orig['bias'])
  assert_trees_allclose(processed, reference)
  nnx.update(abs_linear, processed)
  y = abs_linear(x)
  _, _, _, qwix_reference = _linear_reference(
    qwix_rules(**kw), x, qwix.PtqProvider
  )
  qwix_model = qwix.quantize_model(
    fp_linear, qwix.PtqProvider(qwix_rules(**kw)), x
  )
  nnx.update(qwix_model, qwix_reference)
  if rank is None:
    assert_trees_equal(reference, qwix_reference)
    np.testing.assert_array_equal(y, qwix_model(x))
  else:
    assert set(reference['kernel']) >= {'array', 'a', 'b'}
    assert isinstance(abs_linear.kernel, lqer.WithLqer)
    assert_no_worse(y, qwix_model(x), fp_linear(x))


def test_process_prequantized_params_full_precision_override():
  """A float kernel for a quantized template entry raises."""
  x = jax.random.normal(KEY, (10, 12))
  _, abs_linear, orig, _ = _linear_reference(
    lqer_rules(None, module_path='.*', weight_qtype=jnp.int8, tile_size=4), x
  )
  with pytest.raises(
    ValueError, match='Unhandled or invalid parameter combination'
  ):
    checkpoint_util.process_prequantized_params(
      {'kernel': orig['kernel']}, abs_linear
    )


@RANKS
def test_process_prequantized_params_nnx_einsum_sharding(rank):
  """checkpoint_util_test.test_process_prequantized_params_nnx_einsum_
  sharding: values and shardings follow the (LqerProvider) template."""
  mesh = make_mesh(('fsdp', 'tp'))
  kw = dict(module_path='.*', weight_qtype=jnp.int8, tile_size=4)
  x = jax.random.normal(KEY, (10, 1, 16))
  with jax.set_mesh(mesh):
    fp_einsum = nnx.Einsum(
      'btd,dnh->btnh',
      (16, 8, 10),
      (8, 10),
      rngs=nnx.Rngs(0),
      kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ('fsdp', 'tp', None)
      ),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ('tp', None)),
    )
  state = nnx.state(fp_einsum)
  nnx.update(
    fp_einsum, jax.device_put(state, nnx.get_named_sharding(state, mesh))
  )
  with jax.set_mesh(mesh):
    abs_einsum = nnx.eval_shape(
      lambda: qwix.quantize_model(
        fp_einsum, LqerProvider(lqer_rules(rank, **kw)), x
      )
    )
  reference = lqer_quantize_params(nnx_params(fp_einsum), abs_einsum)
  with jax.set_mesh(mesh):
    processed = checkpoint_util.process_prequantized_params(
      _to_orbax_payload(reference), abs_einsum
    )
  assert_trees_allclose(processed, reference)
  assert_same_shardings(processed, reference)
  with jax.set_mesh(mesh):
    nnx.update(abs_einsum, processed)
    abs_einsum(x)


@pytest.mark.parametrize(
  'modify,regex',
  [
    (lambda p: p['kernel']['array'].pop('scale'), 'scale'),
    (
      lambda p: p['kernel']['array'].update(
        {'qvalue': p['kernel']['array']['qvalue'][:-1]}
      ),
      'shape',
    ),
    (
      lambda p: p['kernel']['array'].update(
        {
          'zero_point': np.zeros_like(
            p['kernel']['array']['scale'],
            dtype=p['kernel']['array']['qvalue'].dtype,
          )
        }
      ),
      'unexpected',
    ),
  ],
  ids=['missing_scale', 'wrong_shape', 'rejects_unexpected_zero_point'],
)
def test_process_prequantized_params_errors(modify, regex):
  """checkpoint_util_test.test_process_prequantized_params_errors."""
  x = jax.random.normal(KEY, (10, 12))
  _, abs_linear, _, reference = _linear_reference(
    lqer_rules(None, weight_qtype=jnp.int8), x
  )
  payload = _to_orbax_payload(reference)
  modify(payload)
  with pytest.raises(ValueError, match=regex):
    checkpoint_util.process_prequantized_params(payload, abs_linear)


def test_process_prequantized_params_allow_extra_params_and_empty():
  """checkpoint_util_test.test_process_prequantized_params_allow_extra_params
  and _empty."""
  x = jax.random.normal(KEY, (10, 12))
  _, abs_linear, _, reference = _linear_reference(
    lqer_rules(None, weight_qtype=jnp.int8), x
  )
  payload = _to_orbax_payload(reference)
  payload['extra'] = np.ones((1,), dtype=np.float32)
  with pytest.raises(ValueError, match='extra'):
    checkpoint_util.process_prequantized_params(
      payload, abs_linear, allow_extra_params=False
    )
  processed = checkpoint_util.process_prequantized_params(
    payload, abs_linear, allow_extra_params=True
  )
  assert 'extra' not in processed
  assert checkpoint_util.process_prequantized_params({}, abs_linear) == {}


@RANKS
def test_process_prequantized_params_nested_modules(rank):
  """checkpoint_util_test.test_process_prequantized_params_nested_modules."""

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.dense1 = nnx.Linear(12, 12, rngs=rngs)
      self.dense2 = nnx.Linear(12, 6, rngs=rngs)

    def __call__(self, x):
      return self.dense2(self.dense1(x))

  mlp = MLP(nnx.Rngs(0))
  x = jax.random.normal(KEY, (10, 12))
  rules = lqer_rules(rank, weight_qtype=jnp.int8)
  abs_mlp = nnx.eval_shape(
    lambda: qwix.quantize_model(mlp, LqerProvider(rules), x)
  )
  reference = lqer_quantize_params(nnx_params(mlp), abs_mlp)
  processed = checkpoint_util.process_prequantized_params(
    _to_orbax_payload(reference), abs_mlp
  )
  assert_trees_allclose(processed, reference)
  nnx.update(abs_mlp, processed)
  y = abs_mlp(x)
  if rank is not None:
    assert isinstance(abs_mlp.dense1.kernel, lqer.WithLqer)
    assert isinstance(abs_mlp.dense2.kernel, lqer.WithLqer)
  qwix_mlp = qwix.quantize_model(
    mlp, qwix.PtqProvider(qwix_rules(weight_qtype=jnp.int8)), x
  )
  if rank is None:
    np.testing.assert_array_equal(y, qwix_mlp(x))
  else:
    assert_no_worse(y, qwix_mlp(x), mlp(x))


@pytest.mark.parametrize('case', ['linear', 'nested', 'no_act'])
def test_restore_quantization_rules_as_lqer_rules(case):
  """RestoreQuantizationRulesTest (linear / nested / no_act) with
  rule_type=LqerRule: rank-less LqerRules, equal field by field."""
  q = lambda dtype: {
    'qvalue': jnp.ones((4, 4), dtype=dtype),
    'scale': jnp.ones((1, 4), dtype=jnp.float32),
  }
  kwargs = {}
  if case == 'linear':
    params = {'kernel': q(jnp.int8), 'bias': jnp.zeros((4,), jnp.float32)}
    expected = [
      LqerRule(
        module_path='',
        weight_qtype=jnp.int8,
        act_qtype=jnp.int8,
        weight_calibration_method='absmax',
        tile_size=4,
      )
    ]
  elif case == 'nested':
    params = {
      'dense1': {'kernel': q(jnp.int8)},
      'dense2': {'kernel': q(jnp.int16)},
    }
    expected = [
      LqerRule(
        module_path='dense1',
        weight_qtype=jnp.int8,
        act_qtype=jnp.int8,
        weight_calibration_method='absmax',
        tile_size=4,
      ),
      LqerRule(
        module_path='dense2',
        weight_qtype=jnp.int16,
        act_qtype=jnp.int16,
        weight_calibration_method='absmax',
        tile_size=4,
      ),
    ]
  else:
    params = {'kernel': q(jnp.int8)}
    kwargs['act_qtype'] = None
    expected = [
      LqerRule(
        module_path='',
        weight_qtype=jnp.int8,
        act_qtype=None,
        weight_calibration_method='absmax',
        tile_size=4,
      )
    ]
  with mock.patch.object(checkpoint_util.logging, 'warning') as warning:
    rules = checkpoint_util.restore_quantization_rules(
      params, LqerRule, tile_size=4, **kwargs
    )
  warning.assert_not_called()
  key = lambda r: r.module_path
  assert sorted(rules, key=key) == sorted(expected, key=key)
  assert all(isinstance(r, LqerRule) and r.rank is None for r in rules)


def _linen_trees(rank_rules, x):
  """(fp params, LQER params, LQER abstract, Qwix params, Qwix abstract)."""
  model = _DenseModel()
  fp = model.init(KEY, x)['params']
  lqer_abs = jax.eval_shape(
    qwix.quantize_model(model, LqerProvider(rank_rules)).init, KEY, x
  )['params']
  qwix_abs = jax.eval_shape(
    qwix.quantize_model(
      model, qwix.PtqProvider(qwix_rules(weight_qtype=jnp.int8))
    ).init,
    KEY,
    x,
  )['params']
  return (
    fp,
    lqer_quantize_params(fp, lqer_abs),
    lqer_abs,
    qwix.quantize_params(fp, qwix_abs),
    qwix_abs,
  )


def test_lqer_checkpoint_round_trip_and_cross_loading(tmp_path):
  """lqer.checkpoints.tree: LQER params round-trip bit-exactly; an LQER
  checkpoint into a plain Qwix template, or a Qwix one into an LQER
  template, raises CheckpointError naming the factors / LqerProvider."""
  x = jax.random.normal(KEY, (5, 32))
  rules = lqer_rules(RANK, weight_qtype=jnp.int8)
  _, lqer_params, lqer_abs, qwix_params, qwix_abs = _linen_trees(rules, x)
  fingerprint = {'model': 'dense'}
  lqer_checkpoint.save(tmp_path / 'lqer', lqer_params, fingerprint)
  assert_trees_equal(
    lqer_checkpoint.load(tmp_path / 'lqer', lqer_abs, fingerprint), lqer_params
  )
  with pytest.raises(
    lqer_checkpoint.CheckpointError, match='(?i)factor|LqerProvider'
  ):
    lqer_checkpoint.load(tmp_path / 'lqer', qwix_abs, fingerprint)

  lqer_checkpoint.save(tmp_path / 'qwix', qwix_params, fingerprint)
  assert_trees_equal(
    lqer_checkpoint.load(tmp_path / 'qwix', qwix_abs, fingerprint), qwix_params
  )
  with pytest.raises(
    lqer_checkpoint.CheckpointError, match='(?i)factor|LqerProvider'
  ):
    lqer_checkpoint.load(tmp_path / 'qwix', lqer_abs, fingerprint)
