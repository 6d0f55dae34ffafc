"""SVDQuant (method='svdquant'): smoothing, SVD-first split, W4A4 inference."""

import dataclasses

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from qwix._src.core import qarray

import lqer
from lqer import LqerProvider
from lqer import LqerRule
from lqer import lqer_quantize_params
from lqer.checkpoints import tree as checkpoint
from lqer.cli import main as cli
from lqer.core import decompose
from lqer.core import metrics
from lqer.quant import stats as stats_lib
from lqer.quant.weight import divide_along
from tests import nnx_flow
from tests import reference

KEY = jax.random.key(0)


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((4, 32), name='up')(x)  # kernel (128, 4, 32)
    h = nn.relu(h)
    return nn.DenseGeneral(64, axis=(-2, -1), name='down')(h)  # (4, 32, 64)


def _outlier_tokens(seed, n=768, d=128):
  return reference.correlated_outlier_activations(
    np.random.default_rng(seed), n, d, n_outliers=6, scale=40.0
  )


def _rules(method='svdquant', rank=16, act=jnp.int4, **kw):
  return [
    LqerRule(
      module_path='.*',
      weight_qtype=jnp.int4,
      act_qtype=act,
      tile_size=32,
      rank=rank,
      method=method,
      **kw,
    )
  ]


def _calibrate(model, rules, fp, x):
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  v = cal.init(KEY, x)
  _, new = jax.jit(cal.apply, static_argnames='mutable')(
    {'params': fp, 'quant_stats': v['quant_stats']}, x, mutable='quant_stats'
  )
  return new['quant_stats']


def _quantize(model, rules, fp, x, **kw):
  stats = _calibrate(model, rules, fp, x)
  qmodel = qwix.quantize_model(model, LqerProvider(rules))
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  return (
    qmodel,
    lqer_quantize_params(fp, abstract, calibration=stats, **kw),
    stats,
  )


@pytest.fixture(scope='module')
def mlp():
  model = _Mlp()
  x = jnp.asarray(_outlier_tokens(0))
  fp = model.init(KEY, x)['params']
  return model, x, fp, model.apply({'params': fp}, x)


def _rel(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def test_smoothing_alone_keeps_the_float_function():
  rng = np.random.default_rng(1)
  x = _outlier_tokens(1, 64, 96)
  w = rng.normal(size=(96, 40)).astype(np.float32)
  for alpha in (0.0, 0.5, 0.85, 1.0):
    lam = decompose.smoothing_scale(jnp.abs(x).max(0), jnp.asarray(w), alpha)
    y = divide_along(jnp.asarray(x), lam, 1) @ (lam[:, None] * w)
    np.testing.assert_allclose(
      y, x @ w, rtol=2e-5, atol=2e-5 * np.abs(x @ w).max()
    )
    want = np.maximum(np.abs(x).max(0), 1e-5) ** alpha / np.maximum(
      np.abs(w).max(1), 1e-5
    ) ** (1 - alpha)
    np.testing.assert_allclose(lam, want, rtol=1e-5)


def test_full_rank_svdquant_gives_the_float_output(mlp):
  """Rank = min(in, out): the branch holds all of diag(lam) W, so the
  quantized residual is ~0 and the int8-activation model is the float one:
  smoothing is folded exactly (input / lam, A = L1 / lam) on both
  multi-axis DenseGeneral layouts."""
  model, x, fp, ref = mlp
  rules = [
    dataclasses.replace(
      _rules(rank=r, act=jnp.int8, solver='exact', factor_dtype=jnp.float32)[0],
      module_path=name,
    )
    for name, r in (('up', 128), ('down', 64))
  ]
  qmodel, params, _ = _quantize(model, rules, fp, x)
  assert params['down']['kernel'].input_scale.shape == (128,)
  assert _rel(qmodel.apply({'params': params}, x), ref) < 1e-4


def test_svd_first_split_matches_numpy(mlp):
  """A, B, lam and the stored base against a float64 NumPy SVDQuant (rank
  6: the six outlier channels' directions, well separated from the rest,
  so float32 and float64 agree on the residual)."""
  model, x, fp, _ = mlp
  rules = _rules(
    rank=6, solver='exact', factor_dtype=jnp.float32, smooth_alpha=0.6
  )
  _, params, stats = _quantize(model, rules, fp, x)
  k = params['up']['kernel']
  w = np.asarray(fp['up']['kernel'], np.float64).reshape(128, 128)
  xmax = np.abs(np.asarray(x, np.float64)).max(0)
  lam = (
    np.maximum(xmax, 1e-5) ** 0.6 / np.maximum(np.abs(w).max(1), 1e-5) ** 0.4
  )
  np.testing.assert_allclose(k.input_scale, lam, rtol=1e-4)
  np.testing.assert_allclose(
    stats_lib.abs_max(stats['up']['kernel_lqer']), xmax, rtol=1e-6
  )
  l1, l2 = reference.svd_factors(lam[:, None] * w, 6)
  a = np.asarray(k.a, np.float64).reshape(128, 6)
  b = np.asarray(k.b, np.float64).reshape(6, 128)
  np.testing.assert_allclose(
    a @ b,
    (l1 / lam[:, None]) @ l2,
    rtol=1e-3,
    atol=1e-4 * np.abs(l1 @ l2).max(),
  )
  # The base is Qwix's RTN of the residual diag(lam) W - L1 L2.
  residual = (lam[:, None] * w - l1 @ l2).reshape(128, 4, 32)
  ours = lqer.quant.bases.rtn(
    jnp.asarray(residual, jnp.float32), k.how, k.layout, None
  )[0]
  np.testing.assert_allclose(k.array.scale, ours.scale, rtol=1e-5)
  # Qwix maps each group's extreme value to +-7.5, a rounding boundary: it
  # may land on -7 or -8 by an ulp of the float32 vs float64 SVD. Every
  # other value is equal.
  q_ours, q_stored = np.asarray(ours.qvalue), np.asarray(k.array.qvalue)
  assert np.all(np.abs(q_ours[q_ours != q_stored]) >= 7)
  assert np.mean(q_ours != q_stored) < 0.01
  deq = np.asarray(qwix.dequantize(k.array), np.float64)
  # Rebuilt weight: deq(Q(R)) / lam + A B ~ W.
  w_hat = deq.reshape(128, 128) / lam[:, None] + a @ b
  assert _rel(w_hat, w) < 0.1


def _w4a4_errors(model, x, fp, ref, methods):
  stats = _calibrate(model, _rules(), fp, x)  # the same for every method
  out = {}
  for name, (method, rank) in methods.items():
    rules = _rules(method, rank)
    qmodel = qwix.quantize_model(model, LqerProvider(rules))
    abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
    params = lqer_quantize_params(fp, abstract, calibration=stats)
    out[name] = _rel(qmodel.apply({'params': params}, x), ref)
  return out


def test_w4a4_svdquant_beats_smoothquant_qera_and_ptq(mlp):
  model, x, fp, ref = mlp
  err = _w4a4_errors(
    model,
    x,
    fp,
    ref,
    {
      'svdquant': ('svdquant', 16),
      'smoothquant': ('svdquant', 0),
      'qera': ('qera', 16),
      'ptq': ('svd', None),
    },
  )
  assert err['svdquant'] < err['smoothquant'] < err['ptq']
  assert err['svdquant'] < err['qera'] < err['ptq']


def test_error_rank_appends_qera_of_the_residual_error(mlp):
  model, x, fp, ref = mlp
  q1, p1, _ = _quantize(model, _rules(rank=12), fp, x)
  q2, p2, stats = _quantize(model, _rules(rank=12, error_rank=4), fp, x)
  k1, k2 = p1['up']['kernel'], p2['up']['kernel']
  assert k2.rank == 16 and k1.rank == 12
  np.testing.assert_array_equal(k1.array.qvalue, k2.array.qvalue)
  # The first 12 columns are the SVD-first branch, unchanged.
  np.testing.assert_allclose(
    k2.a[..., :12].astype(jnp.float32), k1.a.astype(jnp.float32), rtol=1e-6
  )
  # The QERA part lowers the weight-only output error on the calibration
  # distribution (it is QERA's objective) ...
  r1 = lqer.report(fp, p1, stats).total()['output_error']
  r2 = lqer.report(fp, p2, stats).total()['output_error']
  assert r2 < 0.9 * r1
  # ... and the W4A4 output error.
  assert _rel(q2.apply({'params': p2}, x), ref) < _rel(
    q1.apply({'params': p1}, x), ref
  )


class _Dense(nn.Module):  # GPTQ bases need one contracting axis
  @nn.compact
  def __call__(self, x):
    return nn.Dense(24)(x)


def test_gptq_base_on_the_smoothed_statistics():
  x = jnp.asarray(_outlier_tokens(4, 512, 32))  # Qwix's GPTQ: eager per
  model = _Dense()  # column, so few columns
  fp = model.init(KEY, x)['params']
  ref = model.apply({'params': fp}, x)
  rules = [
    LqerRule(
      module_path='.*',
      weight_qtype=jnp.int4,
      act_qtype=jnp.int8,
      rank=8,
      method='svdquant',
    )
  ]
  qmodel, p_gptq, _ = _quantize(model, rules, fp, x, base='gptq')
  _, p_rtn, _ = _quantize(model, rules, fp, x)
  k = p_gptq['Dense_0']['kernel']
  assert k.input_scale is not None and k.rank == 8
  np.testing.assert_array_equal(
    k.input_scale, p_rtn['Dense_0']['kernel'].input_scale
  )
  assert _rel(qmodel.apply({'params': p_gptq}, x), ref) < _rel(
    qmodel.apply({'params': p_rtn}, x), ref
  )


def test_nnx_gemma_einsum_svdquant_packed_and_jitted():
  """NNX einsums with Gemma's layouts (contraction not on leading axes),
  jitted; packed int4 residuals with int8 activations (x / lam quantized
  and dequantized as Qwix would, float32 matmul) agree with Qwix's
  quantized matmul."""

  class Attn(nnx.Module):
    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.q = nnx.Param(init(rngs.params(), (128, 4, 32)))  # D, N, H
      self.o = nnx.Param(init(rngs.params(), (4, 32, 128)))  # N, H, D

    def __call__(self, x):
      h = jnp.einsum('BTD,DNH->BTNH', x, self.q[...])
      return jnp.einsum('BTNH,NHD->BTD', jax.nn.relu(h), self.o[...])

  x = jnp.asarray(_outlier_tokens(3, 256, 128)).reshape(4, 64, 128)
  fp_model = Attn(nnx.Rngs(0))
  ref = fp_model(x)
  rules = [
    LqerRule(
      module_path='.*',
      weight_qtype=jnp.int4,
      act_qtype=jnp.int8,
      tile_size=32,
      rank=16,
      method='svdquant',
    )
  ]
  make = lambda: Attn(nnx.Rngs(0))
  qmodel, fp, stats = nnx_flow.quantized(make, rules, x)
  assert qmodel.o.input_scale.shape == (128,)
  y = nnx.jit(lambda m, x: m(x))(qmodel, x)
  ptq = nnx_flow.ptq(make, rules, x, fp, stats)
  assert _rel(y, ref) < 0.8 * _rel(ptq(x), ref)
  lqer.pack_params(qmodel)
  assert isinstance(qmodel.o.array, lqer.PackedInt4)
  y_packed = nnx.jit(lambda m, x: m(x))(qmodel, x)
  # Both round x / lam to int8, so a last-bit difference in x / lam between
  # the two programs can put an activation one int8 step apart. The suite
  # compiles at LLVM level 0 (conftest), whose float results differ from the
  # default level's in the last bit: measured 9.5e-5 here at level 0, under
  # 1e-5 at the default level.
  assert _rel(y_packed, y) < 3e-4


def test_report_bound_terms_match_a_direct_computation(mlp):
  model, x, fp, _ = mlp
  rules = _rules(rank=16)
  _, params, stats = _quantize(model, rules, fp, x)
  layer = next(
    l for l in lqer.report(fp, params, stats).layers if l.path == 'down/kernel'
  )
  k = params['down']['kernel']
  h = jax.nn.relu(jnp.asarray(x) @ fp['up']['kernel'].reshape(128, 128))
  rows = np.round(np.linspace(0, 767, 256)).astype(int)
  sample = np.asarray(h)[rows]  # the calibration sample: spaced tokens
  np.testing.assert_allclose(
    stats_lib.sample(stats['down']['kernel_lqer']), sample, rtol=1e-5, atol=1e-6
  )
  w = np.asarray(fp['down']['kernel'], np.float64).reshape(128, 64)
  how = qarray.HowToQuantize(
    qtype=jnp.int4,
    channelwise_axes=[0],
    tiled_axes={1: 32},
    calibration_method='absmax',
  )
  qx = lambda v: np.asarray(
    qarray.dequantize(qarray.quantize(jnp.asarray(v, jnp.float32), how)),
    np.float64,
  )
  nrm = np.linalg.norm
  ptq_w = np.asarray(
    qwix.dequantize(
      lqer.quant.bases.rtn(fp['down']['kernel'], k.how, k.layout, None)[0]
    )
  ).reshape(128, 64)
  unit = nrm(sample) * nrm(w)
  want_before = (
    nrm(sample) * nrm(w - ptq_w),
    nrm(sample - qx(sample)) * (nrm(w) + nrm(w - ptq_w)),
  )
  lam = np.asarray(k.input_scale, np.float64)
  a = np.asarray(k.a, np.float64).reshape(128, 16)
  b = np.asarray(k.b, np.float64).reshape(16, 64)
  target = lam[:, None] * (w - a @ b)
  stored = np.asarray(qwix.dequantize(k.array), np.float64).reshape(128, 64)
  xs = sample / lam
  want_after = (
    nrm(xs) * nrm(target - stored),
    nrm(xs - qx(xs)) * (nrm(target) + nrm(target - stored)),
  )
  got = (
    layer.bound_weight_base,
    layer.bound_act_base,
    layer.bound_weight,
    layer.bound_act,
  )
  np.testing.assert_allclose(
    got, np.array([*want_before, *want_after]) / unit, rtol=2e-3
  )
  # Smoothing moved the error from the activation to the weight side.
  assert layer.bound_act < layer.bound_act_base
  assert 'X-term' in lqer.report(fp, params, stats).table()
  got_fn = metrics.error_bound_terms(
    jnp.asarray(xs),
    jnp.asarray(qx(xs)),
    jnp.asarray(target),
    jnp.asarray(stored),
  )
  np.testing.assert_allclose(got_fn, want_after, rtol=1e-4)


def test_stats_accumulate_max_and_a_cyclic_sample():
  rng = np.random.default_rng(2)
  xs = [rng.normal(size=(n, 8)).astype(np.float32) for n in (10, 3, 6)]
  total = stats_lib.batch_sums(jnp.asarray(xs[0]), False, 4)
  for x in xs[1:]:
    total = stats_lib.accumulate(
      total, stats_lib.batch_sums(jnp.asarray(x), False, 4)
    )
  np.testing.assert_array_equal(
    total['max_of_abs'], np.abs(np.concatenate(xs)).max(0)
  )
  assert int(total['count']) == 19 and int(total['sample_rows']) == 11
  # Batch 1 wrote rows 0, 3, 6, 9 into slots 0-3; batch 2 all 3 rows into
  # slots 0-2; batch 3 rows 0, 2, 3, 5 into slots 3, 0, 1, 2.
  want = np.stack([xs[2][2], xs[2][3], xs[2][5], xs[2][0]])
  np.testing.assert_array_equal(stats_lib.sample(total), want)


def test_checkpoint_round_trip_keeps_smoothing(tmp_path, mlp):
  model, x, fp, _ = mlp
  rules = _rules(rank=8, error_rank=2)
  qmodel, params, _ = _quantize(model, rules, fp, x)
  checkpoint.save(str(tmp_path / 'ck'), params, {'k': 1})
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  loaded = checkpoint.load(str(tmp_path / 'ck'), abstract, {'k': 1})
  for name in ('up', 'down'):
    np.testing.assert_array_equal(
      loaded[name]['kernel'].input_scale, params[name]['kernel'].input_scale
    )
  np.testing.assert_array_equal(
    qmodel.apply({'params': loaded}, x), qmodel.apply({'params': params}, x)
  )


@pytest.mark.parametrize(
  'kw,field',
  [
    (dict(smooth_alpha=1.5), 'smooth_alpha'),
    (dict(smooth_alpha=-0.1), 'smooth_alpha'),
    (dict(act_qtype=None), 'act_qtype'),
    (dict(act_static_scale=True), 'act_static_scale'),
    (dict(error_rank=-1), 'error_rank'),
    (dict(method='qera', error_rank=4), 'error_rank'),
    (dict(method='qera', rank=0), 'rank'),
  ],
)
def test_bad_settings_name_the_field(kw, field):
  settings = (
    dict(
      module_path='.*',
      weight_qtype=jnp.int4,
      act_qtype=jnp.int4,
      rank=8,
      method='svdquant',
    )
    | kw
  )
  with pytest.raises(ValueError, match=rf'\.{field}: '):
    LqerRule(**settings)


@pytest.mark.parametrize(
  'argv,message',
  [
    (['--methods', 'qera', 'svdquant'], 'need --act-bits'),
    (['--act-bits', '4', '--smooth-alpha', '1.2'], 'smooth-alpha'),
    (['--act-bits', '4', '--ranks', '8', '--error-rank', '9'], 'error-rank'),
  ],
)
def test_cli_refuses_bad_act_settings_before_loading(argv, message):
  with pytest.raises(SystemExit, match=message):
    cli.main(['eval', '--model', 'minilm', *argv])


def test_awq_or_stored_base_is_refused(mlp):
  model, x, fp, _ = mlp
  rules = _rules(rank=4)
  stats = _calibrate(model, rules, fp, x)
  qmodel = qwix.quantize_model(model, LqerProvider(rules))
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  with pytest.raises(ValueError, match=r"up/kernel: method 'svdquant'"):
    lqer_quantize_params(fp, abstract, calibration=stats, base='awq')
