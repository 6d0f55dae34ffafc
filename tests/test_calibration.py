"""The activation-aware path: calibration statistics, L2QER / QERA, GPTQ / AWQ
bases and the report, each checked against independent NumPy.

Every reference here is computed from the layer's real input, captured from
the float model (Linen: `nn.intercept_methods`; NNX: calling the float
sub-modules), never from lqer's own statistics unless that is the point.
"""

import flax
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from qwix.contrib import awq as qwix_awq
from qwix.contrib import gptq as qwix_gptq

import lqer
from lqer import LqerCalibrationProvider
from lqer import LqerProvider
from lqer import LqerRule
from lqer import lqer_quantize_params
from lqer.quant import stats as stats_lib
from tests import reference

KEY = jax.random.key(0)
REPORT_KEYS = (
  'path',
  'shape',
  'qtype',
  'group_size',
  'rank',
  'method',
  'weight_error_base',
  'weight_error',
  'output_error_base',
  'output_error',
  'snr_db',
  'bits_per_weight',
)


# ---------------------------------------------------------------- helpers --


def _outliers(seed, n, d, scale=30.0):
  """(n, d) correlated tokens with 4 channels ~30x larger than the rest."""
  return reference.correlated_outlier_activations(
    np.random.default_rng(seed), n, d, scale=scale
  )


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _np_sums(x):
  """count, sum |x|, x^T x of (..., in) tokens, in float64 NumPy."""
  x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  return {
    'count': x.shape[0],
    'sum_of_abs': np.abs(x).sum(0),
    'sum_of_xtx': x.T @ x,
  }


def _assert_stats_close(got, want, rtol=1e-5):
  """Stats dicts agree: exact count, sums within rtol of their scale."""
  assert int(got['count']) == int(want['count'])
  for key in ('sum_of_abs', 'sum_of_xtx'):
    g = np.asarray(got[key], np.float64)
    w = np.asarray(want[key], np.float64)
    assert g.shape == w.shape, key
    # Off-diagonal sums of x^T x cancel; measure them on the matrix's scale.
    np.testing.assert_allclose(
      g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=key
    )


def _linen_inputs(model, params, x):
  """The input of every Dense / DenseGeneral call: {'Dense_0': array}."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(
      context.module, (nn.Dense, nn.DenseGeneral)
    ):
      seen['/'.join(context.module.path)] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({'params': params}, x)
  return seen


def _calibrate_linen(model, rules, fp, batches, jit=False):
  cal = qwix.quantize_model(model, LqerCalibrationProvider(rules))
  init = cal.init(KEY, batches[0])
  assert all(int(s['count']) == 0 for s in _stat_leaves(init['quant_stats']))
  v = {'params': fp, 'quant_stats': init['quant_stats']}
  apply = jax.jit(cal.apply, static_argnames='mutable') if jit else cal.apply
  for b in batches:
    _, new = apply(v, b, mutable='quant_stats')
    v = {**v, **new}
  return v['quant_stats']


def _stat_leaves(tree):
  """Every {'count', 'sum_of_abs', ...} dict of a quant_stats tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  out = {}
  for path, value in flat.items():
    out.setdefault(path[:-1], {})[path[-1]] = value
  return list(out.values())


def _stats_at(stats, *path):
  node = stats
  for p in path:
    node = node[p]
  return jax.tree.map(np.asarray, node)


class _Mlp(nn.Module):
  """32 -> 64 -> 64 -> 32. The tests share these shapes (and those of
  `_NnxMlp`), so XLA compiles each eager op and factor kernel once."""

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(64)(x))
    x = nn.gelu(nn.Dense(64)(x))
    return nn.Dense(32)(x)


class _NnxMlp(nnx.Module):
  def __init__(self, *, rngs):
    self.fc1 = nnx.Linear(32, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 32, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x)))


def _abstract(model, rules, x):
  qmodel = qwix.quantize_model(model, LqerProvider(rules))
  return qmodel, jax.eval_shape(qmodel.init, KEY, x)['params']


def _float32_provider(rules):
  """An LqerProvider whose x deq(Wq) runs in float32 (where the provider
  has a compute_dtype option; before it had one, it always did)."""
  try:
    return LqerProvider(rules, compute_dtype=jnp.float32)
  except TypeError:
    return LqerProvider(rules)


def _check_inference(model, rules, params, x, want):
  """The LQER model's output equals `want` (NumPy, float64): to float32
  precision with float32 compute, within bfloat16 rounding by default."""
  x = jnp.asarray(x)  # (a NumPy input trips Qwix's promote_dtype w/o bias)
  want = np.asarray(want, np.float64)
  exact = qwix.quantize_model(model, _float32_provider(rules))
  y = np.asarray(jax.jit(exact.apply)({'params': params}, x), np.float64)
  np.testing.assert_allclose(
    y.reshape(want.shape), want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
  )
  default = qwix.quantize_model(model, LqerProvider(rules))
  y = jax.jit(default.apply)({'params': params}, x)
  assert _rel(np.reshape(y, want.shape), want) < 1e-2


# ------------------------------------------ statistics: exact token means --


def test_gram_assembles_the_upper_blocks_into_x_transpose_x():
  # 3 blocks of 1024 and a ragged one of 50: the lower blocks are the
  # transposes of the upper ones.
  x = np.random.default_rng(0).standard_normal((300, 3 * 1024 + 50))
  got = np.asarray(stats_lib.gram(jnp.asarray(x, jnp.float32)), np.float64)
  want = x.T @ x
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
  np.testing.assert_array_equal(got, got.T)


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_linen_stats_are_exact_token_means(jit):
  """Batches of 10, 6 and 7 tokens == one batch of 23 == NumPy on the input."""
  model = _Mlp()
  x = _outliers(0, 23, 32)
  fp = model.init(KEY, x[:1])['params']
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4, method='qera')]
  batches = [
    x[:10].reshape(2, 5, 32),
    x[10:16].reshape(3, 2, 32),
    x[16:].reshape(1, 7, 32),
  ]
  split = _calibrate_linen(model, rules, fp, batches, jit=jit)
  whole = _calibrate_linen(model, rules, fp, [x], jit=jit)
  inputs = _linen_inputs(model, fp, x)
  assert sorted(inputs) == ['Dense_0', 'Dense_1', 'Dense_2']
  assert np.array_equal(inputs['Dense_0'], x)
  for name, inp in inputs.items():
    got = _stats_at(split, name, 'kernel_lqer')
    assert got['count'].dtype == np.int32
    _assert_stats_close(got, _stats_at(whole, name, 'kernel_lqer'))
    _assert_stats_close(got, _np_sums(inp))
  # The means are token means: a batch of 10 tokens weighs 10/23, not 1/3.
  got = _stats_at(split, 'Dense_0', 'kernel_lqer')
  r = np.asarray(lqer.quant.stats.second_moment(got))
  np.testing.assert_allclose(
    r, x.astype(np.float64).T @ x / 23, rtol=1e-4, atol=1e-4 * np.abs(r).max()
  )
  np.testing.assert_allclose(
    lqer.quant.stats.abs_mean(got), np.abs(x).mean(0), rtol=1e-5
  )


def test_nnx_stats_are_exact_token_means_eager_and_jit():
  model = _NnxMlp(rngs=nnx.Rngs(0))
  x = _outliers(1, 23, 32)
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4, method='qera')]
  batches = [x[:10].reshape(2, 5, 32), x[10:16], x[16:].reshape(1, 7, 32)]
  # Float inputs of each layer, from the float model itself.
  want = {'fc1': _np_sums(x), 'fc2': _np_sums(nnx.gelu(model.fc1(x)))}

  def stats_of(cal):
    return nnx.to_pure_dict(nnx.state(cal, qwix.QuantStat))

  eager = qwix.quantize_model(model, LqerCalibrationProvider(rules), x[:3])
  # The tracing call inside quantize_model does not count.
  assert all(int(s['count']) == 0 for s in _stat_leaves(stats_of(eager)))
  for b in batches:
    eager(b)
  jitted = qwix.quantize_model(model, LqerCalibrationProvider(rules), x[:3])
  step = nnx.jit(lambda m, b: m(b))
  for b in batches:
    step(jitted, b)
  whole = qwix.quantize_model(model, LqerCalibrationProvider(rules), x[:3])
  whole(x)
  for name in ('fc1', 'fc2'):
    got = _stats_at(stats_of(eager), name, 'kernel_lqer')
    _assert_stats_close(got, want[name])
    _assert_stats_close(got, _stats_at(stats_of(whole), name, 'kernel_lqer'))
    _assert_stats_close(
      _stats_at(stats_of(jitted), name, 'kernel_lqer'), want[name]
    )
  # The float model is left alone.
  assert not nnx.state(model, qwix.QuantStat)


@pytest.mark.parametrize('kind', ['dense_general', 'einsum_swapped'])
def test_multi_axis_stats_follow_kernel_order(kind):
  """in = a*b, flattened in the kernel's contracting-axis order; QERA on the
  flattened matrix equals NumPy's.

  DenseGeneral(axis=(-2, -1)) keeps the input's order (a, b); the einsum
  'xtab,bao->xto' contracts the same axes with the kernel's order (b, a).
  """
  a, b, out = 3, 5, 7
  x = _outliers(2, 4 * 16, a * b).reshape(4, 16, a, b)
  if kind == 'dense_general':
    model = nn.DenseGeneral(out, axis=(-2, -1), use_bias=False)
    order = [2, 3]
  else:
    model = nn.Einsum((b, a, out), 'xtab,bao->xto', use_bias=False)
    order = [3, 2]
  fp = model.init(KEY, x)['params']
  kernel = np.asarray(fp['kernel'], np.float64)
  assert kernel.shape[:2] == tuple(x.shape[o] for o in order)
  x_flat = np.transpose(x, (0, 1, *order)).reshape(-1, a * b)
  rules = [
    LqerRule(
      weight_qtype=jnp.int4,
      rank=4,
      method='qera',
      solver='exact',
      factor_dtype=jnp.float32,
    )
  ]
  stats = _calibrate_linen(model, rules, fp, [x[:1], x[1:]])
  got = _stats_at(stats, 'kernel_lqer')
  assert got['sum_of_abs'].shape == (a * b,)
  assert got['sum_of_xtx'].shape == (a * b, a * b)
  _assert_stats_close(got, _np_sums(x_flat))
  # The other order would be wrong: the check above can tell them apart.
  other = np.transpose(x, (0, 1, *order[::-1])).reshape(-1, a * b)
  assert not np.allclose(
    got['sum_of_xtx'], _np_sums(other)['sum_of_xtx'], rtol=1e-3
  )
  _, abstract = _abstract(model, rules, x)
  params = lqer_quantize_params(fp, abstract, calibration=stats)
  k = params['kernel']
  w_m = kernel.reshape(a * b, out)
  deq = np.asarray(qwix.dequantize(k.array), np.float64).reshape(a * b, out)
  ab = np.asarray(k.a, np.float64).reshape(a * b, -1) @ np.asarray(
    k.b, np.float64
  )
  r = x_flat.astype(np.float64).T @ x_flat / len(x_flat)
  ref = reference.qera_product(w_m - deq, r, 4, rules[0].qera_damping)
  assert _rel(ab, ref) < 1e-3
  _check_inference(model, rules, params, x, x_flat @ (deq + ab))


# ------------------------------------------------- one layer vs NumPy ------


@pytest.mark.parametrize('method', ['l2qer', 'qera'])
@pytest.mark.parametrize('qtype,tile', [(jnp.int4, None), ('int8', 16)])
def test_single_dense_matches_numpy(method, qtype, tile):
  x = _outliers(3, 512, 32)
  model = nn.Dense(64, use_bias=False)
  fp = model.init(KEY, x)['params']
  w = np.asarray(fp['kernel'], np.float64)
  rule = LqerRule(
    weight_qtype=qtype,
    tile_size=tile,
    rank=8,
    method=method,
    solver='exact',
    factor_dtype=jnp.float32,
  )
  stats = _calibrate_linen(model, [rule], fp, [x[:200], x[200:]])
  _, abstract = _abstract(model, [rule], x)
  params = lqer_quantize_params(fp, abstract, calibration=stats)
  k = params['kernel']
  assert isinstance(k, lqer.WithLqer) and k.rank == 8
  assert k.a.dtype == jnp.float32 and k.input_scale is None
  deq = np.asarray(qwix.dequantize(k.array), np.float64)
  # The base is Qwix PTQ's RTN, bit for bit.
  ptq_abs = jax.eval_shape(
    qwix.quantize_model(model, qwix.PtqProvider([rule])).init, KEY, x
  )['params']
  ptq = qwix.quantize_params(fp, ptq_abs)['kernel'].array
  np.testing.assert_array_equal(k.array.qvalue, ptq.qvalue)
  e = w - deq
  x64 = x.astype(np.float64)
  if method == 'l2qer':
    ra, rb = reference.l2qer_factors(e, np.abs(x64).mean(0), 8)
    ref = ra @ rb
  else:
    ref = reference.qera_product(e, x64.T @ x64 / len(x), 8, rule.qera_damping)
  ab = np.asarray(k.a, np.float64) @ np.asarray(k.b, np.float64)
  assert _rel(ab, ref) < 1e-3, _rel(ab, ref)
  _check_inference(
    model,
    [rule],
    params,
    x,
    x64 @ deq + (x64 @ np.asarray(k.a, np.float64)) @ k.b,
  )
  # And it helps: the output error falls well below the RTN base's.
  assert reference.output_error(x, w, deq + ab) < 0.5 * reference.output_error(
    x, w, deq
  )


# ----------------------------------- QERA is the optimum on every layer ----


def test_qera_beats_l2qer_and_svd_on_every_layer_and_rank():
  """On each layer's calibration distribution: QERA <= L2QER, QERA <= SVD."""
  model = _Mlp()
  x = _outliers(4, 1024, 32).reshape(8, 128, 32)
  fp = model.init(KEY, x)['params']
  base_rule = LqerRule(weight_qtype=jnp.int4, rank=4, method='qera')
  stats = _calibrate_linen(model, [base_rule], fp, [x[:3], x[3:]], jit=True)
  errors = {}
  for rank in (4, 8, 16):
    for method in ('svd', 'l2qer', 'qera'):
      rules = [
        LqerRule(
          weight_qtype=jnp.int4,
          rank=rank,
          method=method,
          solver='exact',
          factor_dtype=jnp.float32,
          qera_damping=1e-6,
        )
      ]
      _, abstract = _abstract(model, rules, x)
      params = lqer_quantize_params(fp, abstract, calibration=stats)
      rep = lqer.report(fp, params, stats)
      assert len(rep.layers) == 3
      for layer in rep.layers:
        assert layer.rank == rank and layer.method == method
        errors[layer.path, rank, method] = layer.output_error
        base = errors.setdefault(
          (layer.path, rank, 'base'), layer.output_error_base
        )
        assert layer.output_error_base == pytest.approx(base, rel=1e-6)
  for (path, rank, method), err in errors.items():
    if method != 'qera':
      continue
    assert err <= errors[path, rank, 'l2qer'] * (1 + 1e-4), (path, rank)
    assert err <= errors[path, rank, 'svd'] * (1 + 1e-4), (path, rank)
    assert err < errors[path, rank, 'base']
  # On these outlier-heavy inputs the gap is large on the first layer.
  assert (
    errors['Dense_0/kernel', 8, 'qera']
    < 0.5 * errors['Dense_0/kernel', 8, 'svd']
  )


# --------------------------------------------------------------- errors ----


@pytest.fixture(scope='module')
def mlp_setup():
  model = _Mlp()
  x = _outliers(5, 256, 32)
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4, method='qera')]
  stats = _calibrate_linen(model, rules, fp, [x])
  return model, x, fp, stats


def _with_rule(mlp_setup, **kw):
  model, x, fp, stats = mlp_setup
  rule = LqerRule(weight_qtype=jnp.int4, rank=4, solver='exact', **kw)
  return fp, _abstract(model, [rule], x)[1], jax.tree.map(np.array, stats)


@pytest.mark.parametrize('method', ['l2qer', 'qera'])
def test_missing_stats_name_the_weight(mlp_setup, method):
  fp, abstract, stats = _with_rule(mlp_setup, method=method)
  del stats['Dense_0']
  with pytest.raises(
    ValueError, match=r'Dense_0/kernel.*calibration statistics'
  ) as err:
    lqer_quantize_params(fp, abstract, calibration=stats)
  assert 'none were found' in str(err.value) or 'missing' in str(err.value)
  with pytest.raises(
    ValueError, match=r'Dense_0/kernel.*calibration statistics'
  ):
    lqer_quantize_params(fp, abstract, calibration=None)


@pytest.mark.parametrize('base', ['gptq', 'awq'])
def test_calibrated_bases_need_stats_even_for_svd(mlp_setup, base):
  fp, abstract, _ = _with_rule(mlp_setup, method='svd')
  with pytest.raises(
    ValueError,
    match=rf'Dense_0/kernel: base {base!r} needs'
    ' calibration statistics',
  ):
    lqer_quantize_params(fp, abstract, calibration=None, base=base)


def test_svd_needs_no_stats(mlp_setup):
  fp, abstract, _ = _with_rule(mlp_setup, method='svd')
  params = lqer_quantize_params(fp, abstract, calibration=None)
  assert [params[f'Dense_{i}']['kernel'].rank for i in range(3)] == [4] * 3
  rep = lqer.report(fp, params)  # no stats: no output errors
  assert len(rep.layers) == 3
  assert all(l.output_error is None for l in rep.layers)


def test_uncalibrated_zero_stats_are_rejected(mlp_setup):
  model, x, fp, _ = mlp_setup
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4, method='qera')]
  cal = qwix.quantize_model(model, LqerCalibrationProvider(rules))
  zero = cal.init(KEY, x)['quant_stats']  # init only: count 0
  _, abstract = _abstract(model, rules, x)
  with pytest.raises(
    ValueError, match='Dense_0/kernel: calibration statistics saw no tokens'
  ):
    lqer_quantize_params(fp, abstract, calibration=zero)


@pytest.mark.parametrize(
  'method,key', [('qera', 'sum_of_xtx'), ('l2qer', 'sum_of_abs')]
)
def test_nan_stats_name_the_weight(mlp_setup, method, key):
  fp, abstract, stats = _with_rule(mlp_setup, method=method)
  stats['Dense_1']['kernel_lqer'][key][..., 3] = np.nan
  with pytest.raises(
    ValueError,
    match=rf'Dense_1/kernel: calibration'
    rf' statistic {key} holds NaN',
  ):
    lqer_quantize_params(fp, abstract, calibration=stats)


def test_stats_of_another_width_name_the_weight(mlp_setup):
  fp, abstract, stats = _with_rule(mlp_setup, method='qera')
  stats['Dense_0'] = stats['Dense_1']  # 64 input channels, kernel has 32
  with pytest.raises(
    ValueError,
    match='Dense_0/kernel: statistics are for 64'
    ' input channels but the kernel contracts 32',
  ):
    lqer_quantize_params(fp, abstract, calibration=stats)


@pytest.mark.parametrize('method,base', [('qera', 'rtn'), ('svd', 'gptq')])
def test_stats_without_second_moment_name_the_weight(mlp_setup, method, base):
  """LqerCalibrationProvider(second_moment=False) keeps only mean |x|; QERA
  and a GPTQ base need E[x^T x]: a ValueError naming the weight, up front."""
  model, x, fp, _ = mlp_setup
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4, method=method)]
  cal = qwix.quantize_model(
    model, LqerCalibrationProvider(rules, second_moment=False)
  )
  _, new = cal.apply(
    {'params': fp, **cal.init(KEY, x)}, x, mutable='quant_stats'
  )
  stats = new['quant_stats']
  assert 'sum_of_xtx' not in stats['Dense_0']['kernel_lqer']
  _, abstract = _abstract(model, rules, x)
  with pytest.raises(
    ValueError,
    match=r'Dense_0/kernel.*'
    r'(sum_of_xtx|E\[x\^T x\]|second.moment)',
  ):
    lqer_quantize_params(fp, abstract, calibration=stats, base=base)


def test_cholesky_failure_names_the_weight(mlp_setup):
  fp, abstract, stats = _with_rule(mlp_setup, method='qera', qera_damping=0.0)
  s = stats['Dense_1']['kernel_lqer']
  s['sum_of_xtx'] = -np.eye(64, dtype=np.float32) * 5.0
  with pytest.raises(ValueError, match=r'Dense_1/kernel.*Cholesky'):
    lqer_quantize_params(fp, abstract, calibration=stats)
  # Damping cannot rescue a negative-definite matrix either.
  fp, abstract, _ = _with_rule(mlp_setup, method='qera', qera_damping=0.5)
  with pytest.raises(ValueError, match=r'Dense_1/kernel.*Cholesky'):
    lqer_quantize_params(fp, abstract, calibration=stats)


# ------------------------------------------------------ GPTQ / AWQ bases ---


@pytest.fixture(scope='module')
def dense_setup():
  x = _outliers(6, 512, 32)
  model = nn.Dense(64, use_bias=False)
  fp = model.init(KEY, x)['params']
  rule = LqerRule(
    weight_qtype=jnp.int4,
    rank=4,
    method='qera',
    solver='exact',
    factor_dtype=jnp.float32,
  )
  stats = _calibrate_linen(model, [rule], fp, [x[:100], x[100:]])
  qmodel, abstract = _abstract(model, [rule], x)
  return model, x, fp, rule, stats, qmodel, abstract


def test_gptq_base_equals_qwix_gptq_and_qera_beats_it(dense_setup):
  model, x, fp, rule, stats, _, abstract = dense_setup
  w = np.asarray(fp['kernel'], np.float64)
  # Qwix's own GPTQ, from its own calibration pass.
  grules = [qwix_gptq.GptqRule(module_path='.*', weight_qtype=jnp.int4)]
  gcal = qwix.quantize_model(model, qwix_gptq.GptqCalibrationProvider(grules))
  gvars = gcal.init(KEY, x)
  _, gstats = gcal.apply({'params': fp, **gvars}, x, mutable='quant_stats')
  ptq_abs = jax.eval_shape(
    qwix.quantize_model(model, qwix.PtqProvider(grules)).init, KEY, x
  )['params']
  theirs = qwix_gptq.quantize_params(fp, ptq_abs, gstats['quant_stats'])
  theirs = theirs['kernel'].array
  params = lqer_quantize_params(fp, abstract, calibration=stats, base='gptq')
  ours = params['kernel'].array
  deq_ours = np.asarray(qwix.dequantize(ours), np.float64)
  deq_theirs = np.asarray(qwix.dequantize(theirs), np.float64)
  # Same Hessian up to a constant factor: (almost) the same integers.
  assert np.mean(np.asarray(ours.qvalue) != np.asarray(theirs.qvalue)) < 0.01
  np.testing.assert_allclose(ours.scale, theirs.scale, rtol=1e-5)
  err_gptq = reference.output_error(x, w, deq_theirs)
  err_rtn = reference.output_error(
    x,
    w,
    np.asarray(
      qwix.dequantize(qwix.quantize_params(fp, ptq_abs)['kernel'].array),
      np.float64,
    ),
  )
  assert err_gptq < err_rtn
  k = params['kernel']
  ab = np.asarray(k.a, np.float64) @ np.asarray(k.b, np.float64)
  # The factors reconstruct the error of the GPTQ base, not of RTN's.
  ref = reference.qera_product(
    w - deq_ours, x.astype(np.float64).T @ x / len(x), 4, rule.qera_damping
  )
  assert _rel(ab, ref) < 1e-3
  err_lqer = reference.output_error(x, w, deq_ours + ab)
  assert err_lqer < 0.7 * err_gptq
  rep = lqer.report(fp, params, stats).layers[0]
  rtn = lqer.report(
    fp, lqer_quantize_params(fp, abstract, calibration=stats), stats
  ).layers[0]
  assert rep.output_error_base == pytest.approx(
    reference.output_error(x, w, deq_ours), rel=1e-3
  )
  assert rep.output_error == pytest.approx(err_lqer, rel=1e-3)
  assert rep.output_error_base < rtn.output_error_base
  assert rep.output_error < rep.output_error_base


def test_awq_base_inference_matches_numpy_and_qera_beats_awq(dense_setup):
  model, x, fp, rule, stats, _, abstract = dense_setup
  w = np.asarray(fp['kernel'], np.float64)
  params = lqer_quantize_params(fp, abstract, calibration=stats, base='awq')
  k = params['kernel']
  assert isinstance(k, lqer.WithLqer) and k.input_scale is not None
  s = np.asarray(k.input_scale, np.float64)
  assert s.shape == (32,) and np.all(s > 0)
  assert not np.allclose(s, s[0])  # the outlier channels got their own scale
  base = np.asarray(qwix.dequantize(k.array), np.float64) / s[:, None]
  a, b = np.asarray(k.a, np.float64), np.asarray(k.b, np.float64)
  x_eval = _outliers(6, 600, 32)[512:]  # unseen rows, same distribution
  x64 = x_eval.astype(np.float64)
  _check_inference(model, [rule], params, x_eval, x64 @ base + (x64 @ a) @ b)
  # Qwix's own AWQ on the same mean |x| gives the same scales.
  arules = [qwix_awq.AwqRule(module_path='.*', weight_qtype=jnp.int4)]
  acal = qwix.quantize_model(model, qwix_awq.AwqCalibrationProvider(arules))
  _, astats = acal.apply(
    {'params': fp, **acal.init(KEY, x)}, x, mutable='quant_stats'
  )
  ptq_abs = jax.eval_shape(
    qwix.quantize_model(model, qwix.PtqProvider(arules)).init, KEY, x
  )['params']
  theirs = qwix_awq.quantize_params(fp, ptq_abs, astats['quant_stats'])
  np.testing.assert_allclose(s, theirs['kernel'].awq_scale, rtol=1e-5)
  err_awq = reference.output_error(x, w, base)
  err = reference.output_error(x, w, base + a @ b)
  assert err < 0.7 * err_awq
  rep = lqer.report(fp, params, stats).layers[0]
  assert rep.output_error_base == pytest.approx(err_awq, rel=1e-3)
  assert rep.output_error == pytest.approx(err, rel=1e-3)
  # Bits: int4 codes, f32 scale per output channel, f32 factors of rank 4,
  # and the f32 AWQ scale per input channel.
  n_in, n_out = 32, 64
  assert rep.bits_per_weight == pytest.approx(
    4
    + 32 * n_out / (n_in * n_out)
    + 32 * 4 * (n_in + n_out) / (n_in * n_out)
    + 32 * n_in / (n_in * n_out)
  )


# ------------------------------------------------------------------ NNX ----


def test_nnx_qera_flow_beats_ptq():
  model = _NnxMlp(rngs=nnx.Rngs(0))
  data = _outliers(7, 40 * 16, 32).reshape(40, 16, 32)
  cal_batches, x_eval = [data[:20], data[20:32]], data[32:]
  rules = [
    LqerRule(weight_qtype=jnp.int4, rank=8, method='qera', solver='exact')
  ]
  cal = qwix.quantize_model(model, LqerCalibrationProvider(rules), data[:1])
  for b in cal_batches:
    cal(b)
  stats = nnx.to_pure_dict(nnx.state(cal, qwix.QuantStat))
  fp = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for name in ('fc1', 'fc2'):
    assert int(stats[name]['kernel_lqer']['count']) == 32 * 16
  abstract = nnx.eval_shape(
    lambda: qwix.quantize_model(model, LqerProvider(rules), data[:1])
  )
  nnx.update(abstract, lqer_quantize_params(fp, abstract, calibration=stats))
  assert isinstance(abstract.fc1.kernel, lqer.WithLqer)
  assert abstract.fc2.kernel.rule.method == 'qera'
  y_fp = model(x_eval)
  err = _rel(abstract(x_eval), y_fp)
  ptq = qwix.quantize_model(model, qwix.PtqProvider(rules), data[:1])
  err_ptq = _rel(ptq(x_eval), y_fp)
  assert err < 0.7 * err_ptq, (err, err_ptq)
  # The report reads the NNX model and the NNX stats tree.
  rep = lqer.report(fp, abstract, stats)
  assert [l.path for l in rep.layers] == ['fc1/kernel', 'fc2/kernel']
  assert all(l.output_error < l.output_error_base for l in rep.layers)


# --------------------------------------------------------------- report ----


def test_report_fields_table_errors_and_bits():
  model = _Mlp()
  x = _outliers(8, 256, 32)
  fp = model.init(KEY, x)['params']
  k = 4
  rules = [
    # (32, 64): int4 per-channel, bf16 factors.
    LqerRule(
      module_path='Dense_0',
      weight_qtype=jnp.int4,
      rank=k,
      method='qera',
      solver='exact',
    ),
    # (64, 64): plain int8 PTQ.
    LqerRule(module_path='Dense_1', weight_qtype=jnp.int8),
    # (64, 32): int4 in groups of 16, f32 factors.
    LqerRule(
      module_path='Dense_2',
      weight_qtype=jnp.int4,
      tile_size=16,
      rank=k,
      method='l2qer',
      solver='exact',
      factor_dtype=jnp.float32,
    ),
  ]
  stats = _calibrate_linen(model, rules, fp, [x[:64], x[64:]])
  _, abstract = _abstract(model, rules, x)
  params = lqer_quantize_params(fp, abstract, calibration=stats)
  rep = lqer.report(fp, params, stats)
  dicts = rep.to_dicts()
  paths = ['Dense_0/kernel', 'Dense_1/kernel', 'Dense_2/kernel']
  assert [d['path'] for d in dicts] == paths
  for d in dicts:
    assert set(REPORT_KEYS) <= set(d), set(REPORT_KEYS) - set(d)
  by = {d['path'].split('/')[0]: d for d in dicts}
  assert (by['Dense_0']['method'], by['Dense_0']['rank']) == ('qera', k)
  assert (by['Dense_1']['method'], by['Dense_1']['rank']) == ('ptq', 0)
  assert (by['Dense_2']['method'], by['Dense_2']['rank']) == ('l2qer', k)
  assert [by[n]['group_size'] for n in by] == [None, None, 16]
  assert [by[n]['qtype'] for n in by] == ['int4', 'int8', 'int4']
  assert [tuple(by[n]['shape']) for n in by] == [(32, 64), (64, 64), (64, 32)]
  table = rep.table()
  for p in paths:
    assert p in table
  assert table.splitlines()[-1].startswith('TOTAL')
  # Output errors: the empirical ones on the calibration inputs, in NumPy.
  inputs = _linen_inputs(model, fp, x)
  for name, d in by.items():
    w = np.asarray(fp[name]['kernel'], np.float64)
    q = params[name]['kernel']
    base = np.asarray(qwix.dequantize(q.array), np.float64)
    hat = base
    if isinstance(q, lqer.WithLqer):
      hat = base + np.asarray(q.a, np.float64) @ np.asarray(q.b, np.float64)
    np.testing.assert_allclose(
      d['output_error'],
      reference.output_error(inputs[name], w, hat),
      rtol=1e-3,
      err_msg=name,
    )
    np.testing.assert_allclose(
      d['output_error_base'],
      reference.output_error(inputs[name], w, base),
      rtol=1e-3,
      err_msg=name,
    )
    np.testing.assert_allclose(
      d['weight_error'],
      np.linalg.norm(w - hat) / np.linalg.norm(w),
      rtol=1e-4,
      err_msg=name,
    )
    np.testing.assert_allclose(
      d['snr_db'],
      10 * np.log10(np.sum(w**2) / np.sum((w - hat) ** 2)),
      rtol=1e-4,
      err_msg=name,
    )
  assert by['Dense_0']['output_error'] < by['Dense_0']['output_error_base']
  assert by['Dense_2']['output_error'] < by['Dense_2']['output_error_base']
  # Bits per weight, counted by hand: values, f32 scales, factors.
  n_in, n_out = 32, 64  # 4 + 1 + 3
  assert by['Dense_0']['bits_per_weight'] == pytest.approx(
    4 + 32 * n_out / (n_in * n_out) + 16 * k * (n_in + n_out) / (n_in * n_out)
  )
  assert by['Dense_1']['bits_per_weight'] == pytest.approx(8 + 32 / 64)
  n_in, n_out = 64, 32  # 4 + 2 + 6
  assert by['Dense_2']['bits_per_weight'] == pytest.approx(
    4
    + 32 * (n_in // 16) * n_out / (n_in * n_out)
    + 32 * k * (n_in + n_out) / (n_in * n_out)
  )
  total = rep.total()
  n = np.array([32 * 64, 64 * 64, 64 * 32], float)
  assert total['num_weights'] == n.sum()
  assert total['output_error'] == pytest.approx(
    sum(w * d['output_error'] for w, d in zip(n, dicts)) / n.sum()
  )
  assert total['bits_per_weight'] == pytest.approx(
    sum(w * d['bits_per_weight'] for w, d in zip(n, dicts)) / n.sum()
  )


# ------------------------------------------------------ output gradients --


def _tapped_reference(weights, x, v):
  """The cotangent at each op's output for output direction v, from the
  model written out with a zero perturbation added after each op."""

  def f(d_up, d_qkv, d_o):
    h = nn.gelu(x @ weights['up'] + d_up)
    h = jnp.einsum('btd,ndh->btnh', h, weights['qkv']) + d_qkv
    return jnp.einsum('btnh,nhd->btd', nn.gelu(h), weights['o']) + d_o

  zeros = (
    jnp.zeros(x.shape[:2] + (32,)),
    jnp.zeros(x.shape[:2] + (2, 8)),
    jnp.zeros(x.shape[:2] + (12,)),
  )
  y, pullback = jax.vjp(f, *zeros)
  return y, dict(zip(('up', 'qkv', 'o'), pullback(v)))


class _Tapped(nn.Module):
  """A Dense, a Gemma-style einsum contracting its middle axis, and an
  einsum contracting two axes."""

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(0.3)
    h = nn.gelu(nn.Dense(32, use_bias=False, name='up')(x))
    h = jnp.einsum('btd,ndh->btnh', h, self.param('qkv', init, (2, 32, 8)))
    return jnp.einsum(
      'btnh,nhd->btd', nn.gelu(h), self.param('o', init, (2, 8, 12))
    )


class _NnxTapped(nnx.Module):
  def __init__(self, weights):
    self.up = nnx.Linear(16, 32, use_bias=False, rngs=nnx.Rngs(0))
    self.up.kernel.value = weights['up']
    self.qkv = nnx.Param(weights['qkv'])
    self.o = nnx.Param(weights['o'])

  def __call__(self, x):
    h = jnp.einsum('btd,ndh->btnh', nn.gelu(self.up(x)), self.qkv)
    return jnp.einsum('btnh,nhd->btd', nn.gelu(h), self.o)


@pytest.mark.parametrize('output', ['gaussian', 'softmax'])
@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_output_gradients_sum_each_ops_squared_cotangent(api, output):
  """sum_of_g2 is sum_t g_{t,o}^2 of the cotangent at the op's output for
  the direction each batch draws (the same draw rebuilt here), output
  channels in the kernel's order (qkv's (N, H) with its contraction in the
  middle); grad_count the tokens; two batches."""
  batches = [
    (jax.random.normal(jax.random.key(i), (2, 5, 16)),) for i in range(2)
  ]
  model = _Tapped()
  params = model.init(KEY, *batches[0])['params']
  weights = {
    'up': params['up']['kernel'],
    'qkv': params['qkv'],
    'o': params['o'],
  }
  rules = [
    LqerRule(module_path='.*', weight_qtype='int4', rank=2, method='qera')
  ]
  if api == 'linen':
    cal = qwix.quantize_model(model, LqerCalibrationProvider(rules))
    stats = lqer.calibrate(cal, params, batches)
    tapped = qwix.quantize_model(
      model, LqerCalibrationProvider(rules, output_gradients=True)
    )
    got = lqer.output_gradients(
      tapped, params, batches, stats, output=output, seed=3
    )
    got = {
      'up': got['up']['kernel_lqer'],
      'qkv': got['qkv_lqer'],
      'o': got['o_lqer'],
    }
  else:
    make = lambda: _NnxTapped(weights)
    cal = qwix.quantize_model(
      make(), LqerCalibrationProvider(rules), *batches[0]
    )
    for batch in batches:
      cal(*batch)
    stats = nnx.to_pure_dict(nnx.state(cal, qwix.QuantStat))
    tapped = qwix.quantize_model(
      make(), LqerCalibrationProvider(rules, output_gradients=True), *batches[0]
    )
    got = lqer.output_gradients(
      tapped, None, batches, stats, output=output, seed=3
    )
    got = {
      'up': got['up']['kernel_lqer'],
      'qkv': got['qkv_lqer'],
      'o': got['o_lqer'],
    }
  want = {k: 0.0 for k in weights}
  for i, (x,) in enumerate(batches):
    y, _ = _tapped_reference(weights, x, jnp.zeros((2, 5, 12)))
    key = jax.random.split(jax.random.fold_in(jax.random.key(3), i), 1)[0]
    _, cot = _tapped_reference(
      weights, x, lqer.offline.probe.direction(output, key, y)
    )
    for k, g in cot.items():
      want[k] = want[k] + np.sum(
        np.square(np.asarray(g, np.float64)).reshape(10, -1), axis=0
      )
  for k in weights:
    np.testing.assert_allclose(got[k]['sum_of_g2'], want[k], rtol=1e-4)
    assert float(got[k]['grad_count']) == 20
    assert int(got[k]['count']) == 20  # the input statistics are kept


def test_output_gradients_refuse_a_model_without_taps():
  x = jnp.ones((2, 5, 16))
  model = _Tapped()
  params = model.init(KEY, x)['params']
  rules = [LqerRule(module_path='nothing', weight_qtype='int4', rank=2)]
  tapped = qwix.quantize_model(
    model, LqerCalibrationProvider(rules, output_gradients=True)
  )
  with pytest.raises(ValueError, match='taps no op'):
    lqer.output_gradients(tapped, params, [(x,)], {})
