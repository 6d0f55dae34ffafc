"""Quality per bit: quantized factors, rank allocation, refinement."""

import dataclasses

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

import lqer
from lqer import LqerProvider
from lqer import LqerRule
from lqer import lqer_quantize_params
from lqer.checkpoints import tree as checkpoint
from lqer.cli import main as cli
from lqer.core import decompose
from lqer.offline import allocation
from lqer.offline import probe as probe_lib
from lqer.quant import stats as stats_lib
from tests import nnx_flow
from tests import reference

KEY = jax.random.key(0)


class _Mlp(nn.Module):
  """Dense 256 -> 384 -> 256 and a DenseGeneral with two contracting axes."""

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(384, use_bias=False, name='up')(x))
    h = nn.DenseGeneral((4, 64), use_bias=False, name='mid')(h)
    return nn.DenseGeneral(256, axis=(-2, -1), use_bias=False, name='down')(
      nn.gelu(h)
    )


def _rules(rank=16, method='qera', **kw):
  return [
    LqerRule(
      module_path='.*',
      weight_qtype=jnp.int4,
      tile_size=64,
      rank=rank,
      method=method,
      **kw,
    )
  ]


@pytest.fixture(scope='module')
def mlp():
  model = _Mlp()
  x = jnp.asarray(
    reference.correlated_outlier_activations(np.random.default_rng(0), 768, 256)
  )
  fp = model.init(KEY, x)['params']
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(_rules()))
  v = cal.init(KEY, x)
  _, new = jax.jit(cal.apply, static_argnames='mutable')(
    {'params': fp, **v}, x, mutable='quant_stats'
  )
  return model, x, fp, model.apply({'params': fp}, x), new['quant_stats']


@pytest.fixture(scope='module')
def ptq(mlp):
  """Plain PTQ of the same weights: (model, params, bits per weight)."""
  model, params = _quantize(mlp, _rules(rank=None))
  bits = {l.path: l.bits_per_weight for l in lqer.report(mlp[2], params).layers}
  return model, params, bits


def _quantize(mlp, rules, **kw):
  model, x, fp, _, stats = mlp
  qmodel = qwix.quantize_model(model, LqerProvider(rules))
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  return qmodel, lqer_quantize_params(fp, abstract, calibration=stats, **kw)


def _rel(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def _np_quantize(m, bits, axis):
  """Symmetric absmax per slice, written from the formula."""
  qmax = 2 ** (bits - 1) - 1
  amax = np.abs(m).max(axis=axis, keepdims=True)
  scale = np.where(amax > 0, amax / qmax, 1.0)
  return np.clip(np.round(m / scale), -qmax, qmax), scale


# ------------------------------------------------------ quantized factors --


@pytest.mark.parametrize('method', ['svd', 'l2qer', 'qera'])
def test_refit_is_the_weighted_least_squares_solution(method):
  rng = np.random.default_rng(1)
  x = reference.correlated_outlier_activations(rng, 512, 96)
  e = rng.normal(size=(96, 80)).astype(np.float32)
  a, _ = reference.svd_factors(e, 12)
  qa, sa = _np_quantize(a, 4, axis=0)
  a_hat = qa * sa
  if method == 'svd':
    t = np.eye(96)
    stats = {}
  elif method == 'l2qer':
    s = np.maximum(np.abs(x).mean(0), 1e-4)
    t = np.diag(s / np.sqrt(s.min() * s.max()))
    stats = {'act_abs_mean': jnp.asarray(np.abs(x).mean(0))}
  else:
    r = x.astype(np.float64).T @ x / len(x)
    chol = decompose.damped_cholesky(jnp.asarray(r, jnp.float32), 0.01)
    t = np.asarray(chol, np.float64).T
    stats = {'chol': chol}
  want = np.linalg.lstsq(t @ a_hat, t @ e, rcond=None)[0]
  got = decompose.refit_right(
    decompose.weigh(jnp.asarray(e), method, **stats),
    decompose.weigh(jnp.asarray(a_hat, jnp.float32), method, **stats),
  )
  assert _rel(got, want) < 1e-3
  # End to end: A's integers and scales as NumPy's, B the refit, rounded.
  qa2, sa2, qb, sb = decompose.quantize_factors(
    jnp.asarray(e), jnp.asarray(a, jnp.float32), 4, method, **stats
  )
  np.testing.assert_array_equal(qa2, qa)
  np.testing.assert_allclose(sa2, sa, rtol=1e-6)
  qb_ref, sb_ref = _np_quantize(np.asarray(got, np.float64), 4, axis=1)
  np.testing.assert_allclose(sb, sb_ref, rtol=1e-5)
  assert np.mean(np.asarray(qb) != qb_ref) < 1e-3
  # The refit absorbs A's rounding: better than rounding B as fitted.
  b_float = np.linalg.lstsq(a, e, rcond=None)[0]
  qb0, sb0 = _np_quantize(b_float, 4, axis=1)
  objective = lambda b: np.linalg.norm(t @ (e - a_hat @ b))
  assert objective(np.asarray(qb * sb)) < objective(qb0 * sb0)


def test_quantized_factors_on_every_path(mlp, ptq):
  model, x, fp, y_fp, _ = mlp
  fmodel, float_params = _quantize(mlp, _rules(factor_dtype=jnp.float32))
  y_float = fmodel.apply({'params': float_params}, x)
  errors = {}
  for qtype in ('int8', 'int4'):
    qmodel, params = _quantize(mlp, _rules(factor_qtype=qtype))
    k = params['mid']['kernel']
    bits = 8 if qtype == 'int8' else 4
    assert k.a.dtype == jnp.dtype(qtype) and k.b.dtype == jnp.dtype(qtype)
    assert np.abs(np.asarray(k.a, np.int32)).max() <= 2 ** (bits - 1) - 1
    assert k.a_scale.shape == (1, 16) and k.b_scale.shape == (16, 1, 1)
    y = jax.jit(qmodel.apply)({'params': params}, x)
    errors[qtype] = _rel(y, y_fp)
    # The branch dequantizes at use: equal to float factors A = a * sa.
    a, b = (np.asarray(f, np.float64) for f in k.factors())
    np.testing.assert_allclose(
      a,
      np.asarray(k.a, np.float64) * np.asarray(k.a_scale, np.float64),
      rtol=1e-6,
    )
    f32 = jax.jit(
      qwix.quantize_model(
        model,
        LqerProvider(_rules(factor_qtype=qtype), compute_dtype=jnp.float32),
      ).apply
    )
    packed = lqer.pack_params(params)
    assert isinstance(packed['mid']['kernel'].array, lqer.PackedInt4)
    assert _rel(f32({'params': packed}, x), f32({'params': params}, x)) < 1e-5
  err_float = _rel(y_float, y_fp)
  pmodel, ptq_params, _ = ptq
  err_ptq = _rel(pmodel.apply({'params': ptq_params}, x), y_fp)
  assert errors['int8'] < 1.02 * err_float
  assert err_float < errors['int4'] < 0.8 * err_ptq


def test_report_counts_factor_bits_as_stored(mlp):
  _, _, fp, _, stats = mlp
  for qtype, value_bits in ((None, 16), ('int8', 8), ('int4', 4)):
    _, params = _quantize(mlp, _rules(factor_qtype=qtype))
    layer = next(
      l for l in lqer.report(fp, params, stats).layers if l.path == 'up/kernel'
    )
    n, k = 256 * 384, 16
    base = 4 + 32 / 64  # int4 values + a float32 scale per 64
    scales = 0 if qtype is None else 2 * k * 16  # bfloat16 scales
    want = base + (k * (256 + 384) * value_bits + scales) / n
    assert layer.bits_per_weight == pytest.approx(want, rel=1e-9)


def test_svdquant_quantized_branch_is_absorbed_by_the_residual(mlp):
  model, x, fp, y_fp, _ = mlp
  rules = lambda q: [
    LqerRule(
      module_path='.*',
      weight_qtype=jnp.int4,
      act_qtype=jnp.int8,
      tile_size=64,
      rank=16,
      method='svdquant',
      factor_qtype=q,
    )
  ]
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules(None)))
  v = cal.init(KEY, x)
  _, stats = cal.apply({'params': fp, **v}, x, mutable='quant_stats')
  errs = {}
  for q in (None, 'int4'):
    qmodel = qwix.quantize_model(model, LqerProvider(rules(q)))
    abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
    params = lqer_quantize_params(
      fp, abstract, calibration=stats['quant_stats']
    )
    errs[q] = _rel(qmodel.apply({'params': params}, x), y_fp)
  assert params['up']['kernel'].a.dtype == jnp.int4
  assert errs['int4'] < 1.1 * errs[None]


# ----------------------------------------------------------- refinement --


def _damped_objective(params, fp, stats, path, damping=0.01):
  """||L^T (W - deq(Q)/s - A B)||_F^2 in NumPy, from the stored weight."""
  k = params[path]['kernel']
  w = np.asarray(fp[path]['kernel'], np.float64).reshape(k.layout.in_size, -1)
  base = np.asarray(qwix.dequantize(k.array), np.float64).reshape(w.shape)
  a, b = (
    np.asarray(f, np.float64) for f in k.layout.merge_factors(*k.factors())
  )
  r = np.asarray(
    stats_lib.second_moment(stats_lib.lookup(stats, (path, 'kernel'))),
    np.float64,
  )
  r = r + damping * np.mean(np.diag(r)) * np.eye(len(r))
  d = w - base - a @ b
  return float(np.trace(d.T @ r @ d))


def test_refinement_never_increases_the_objective(mlp):
  _, _, fp, _, stats = mlp
  history = {p: [] for p in ('up', 'mid', 'down')}
  for iters in range(4):
    _, params = _quantize(
      mlp, _rules(refine_iters=iters, factor_dtype=jnp.float32)
    )
    for path in history:
      history[path].append(_damped_objective(params, fp, stats, path))
  for path, values in history.items():
    assert all(b <= a * (1 + 1e-6) for a, b in zip(values, values[1:])), (
      path,
      values,
    )
  # Not vacuous: some weight improves.
  assert any(v[-1] < 0.99 * v[0] for v in history.values())


# ---------------------------------------------------------- allocation --


def _extra_bits(mlp, ptq, params):
  """Report's bits of everything stored minus PTQ's, summed."""
  _, _, fp, _, stats = mlp
  return sum(
    (l.bits_per_weight - ptq[2][l.path]) * l.num_weights
    for l in lqer.report(fp, params, stats).layers
  )


@pytest.mark.parametrize('qtype', [None, 'int8'])
def test_allocation_spends_the_budget_as_the_report_counts(mlp, ptq, qtype):
  _, x, fp, y_fp, _ = mlp
  n = sum(w.size for w in jax.tree.leaves(fp))
  budget = allocation.Budget(1.0)  # a value: both calls below reuse it
  qmodel, (params, alloc) = _quantize(
    mlp,
    _rules(rank='auto', factor_qtype=qtype),
    budget_bits=budget,
    return_allocation=True,
  )
  spent = _extra_bits(mlp, ptq, params)
  ranks = {p: params[p]['kernel'].rank for p in ('up', 'mid', 'down')}
  assert alloc.ranks == {(p, 'kernel'): r for p, r in ranks.items()}
  assert alloc.spent_bits == pytest.approx(spent, rel=1e-12)  # as the report
  budget = budget.bits_per_weight
  assert spent <= budget * n
  # Greedy stops when no further rank fits, or at a weight's max rank
  # (twice the uniform rank: 2 x 9.1 -> 24 here).
  cost = max((256 + 384) * (16 if qtype is None else 8 + 32 / 16), 1)
  assert spent > budget * n - cost or max(ranks.values()) == 24, ranks
  assert len(set(ranks.values())) > 1, ranks
  _, again = _quantize(
    mlp,
    _rules(rank='auto', factor_qtype=qtype),
    budget_bits=allocation.Budget(budget),
  )
  for path in ranks:
    np.testing.assert_array_equal(
      again[path]['kernel'].a, params[path]['kernel'].a
    )
  y = qmodel.apply({'params': params}, x)
  pmodel, ptq_params, _ = ptq
  assert _rel(y, y_fp) < 0.8 * _rel(
    pmodel.apply({'params': ptq_params}, x), y_fp
  )


def test_allocation_follows_the_spectrum():
  """Three same-shaped layers: one whose error is concentrated in a few
  directions (decaying spectrum), one flat (random noise), one where the
  quantization error is tiny. The decaying one gets most of the budget,
  the flat one rank 0."""
  rng = np.random.default_rng(2)
  d = 128
  fp = {}
  low = rng.normal(size=(d, 4)) @ rng.normal(size=(4, d))
  fp['decay'] = rng.normal(size=(d, d)) * 0.01 + low * np.where(
    rng.random((d, d)) < 0.02, 30, 1
  )  # outliers -> structured error
  fp['flat'] = rng.normal(size=(d, d))
  fp['small'] = rng.normal(size=(d, d)) * 1e-3 + np.eye(d)
  params = {k: {'kernel': jnp.asarray(v, jnp.float32)} for k, v in fp.items()}

  class Three(nn.Module):
    @nn.compact
    def __call__(self, x):
      return sum(nn.Dense(d, use_bias=False, name=k)(x) for k in fp)

  x = jnp.asarray(rng.normal(size=(8, d)), jnp.float32)
  rules = [
    LqerRule(
      module_path='.*',
      weight_qtype=jnp.int4,
      tile_size=32,
      rank='auto',
      method='svd',
      max_rank=64,
    )
  ]
  qmodel = qwix.quantize_model(Three(), LqerProvider(rules))
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  out = lqer_quantize_params(params, abstract, budget_bits=0.5)
  ranks = {k: out[k]['kernel'].rank for k in fp}
  assert ranks['flat'] == 0 and ranks['decay'] > ranks['small'], ranks
  spent = ranks['decay'] + ranks['small']
  assert ranks['decay'] >= 0.6 * spent


class _Scaled(nn.Module):
  """Dense layers whose outputs are scaled per channel, then summed: how
  much each output channel matters is known exactly."""

  scales: dict

  @nn.compact
  def __call__(self, x):
    return sum(
      nn.Dense(x.shape[-1], use_bias=False, name=k)(x) * c
      for k, c in self.scales.items()
    )


def _gradient_allocation(scales, budget, **rule_kw):
  """(ranks, Allocation, params, tokens, quantize) of _Scaled(scales)
  allocated under `budget` from calibration and output-gradient statistics
  (8 batches); quantize(rank) -> (output error vs float, params) of the same
  model at a uniform rank, from the same statistics."""
  rng = np.random.default_rng(5)
  batches = [
    (jnp.asarray(reference.correlated_outlier_activations(rng, 512, 128)),)
    for _ in range(8)
  ]
  model = _Scaled(scales)
  fp = model.init(KEY, *batches[0])['params']
  rules = [
    LqerRule(
      module_path='.*',
      weight_qtype=jnp.int4,
      tile_size=32,
      rank='auto',
      method='qera',
      max_rank=32,
      **rule_kw,
    )
  ]
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  stats = lqer.calibrate(cal, fp, batches)
  tapped = qwix.quantize_model(
    model, lqer.LqerCalibrationProvider(rules, output_gradients=True)
  )
  stats = lqer.output_gradients(tapped, fp, batches, stats)
  qmodel = qwix.quantize_model(model, LqerProvider(rules))
  abstract = jax.eval_shape(qmodel.init, KEY, *batches[0])['params']
  params, alloc = lqer_quantize_params(
    fp, abstract, calibration=stats, budget_bits=budget, return_allocation=True
  )
  x = np.concatenate([np.asarray(b[0]) for b in batches])
  y_fp = model.apply({'params': fp}, x)

  def quantize(rank=None):
    """Output error against float of the allocated params (rank None) or
    of a uniform rank, and those params."""
    if rank is None:
      q, p = qmodel, params
    else:
      uniform = [dataclasses.replace(rules[0], rank=rank, max_rank=None)]
      q = qwix.quantize_model(model, LqerProvider(uniform))
      p = lqer_quantize_params(
        fp,
        jax.eval_shape(q.init, KEY, *batches[0])['params'],
        calibration=stats,
      )
    return _rel(jax.jit(q.apply)({'params': p}, x), y_fp), p

  return (
    {k: params[k]['kernel'].rank for k in scales},
    alloc,
    params,
    x,
    quantize,
  )


def test_output_gradients_steer_the_allocation():
  """Two same-shaped layers, one output scaled 10x and one 0.1x: with
  output-gradient statistics (the default valuation when present), the
  loud one takes the budget, whichever it is; by size alone they tie."""
  for loud, quiet in (('a', 'b'), ('b', 'a')):
    ranks, alloc, _, _, _ = _gradient_allocation(
      {loud: 10.0, quiet: 0.1}, allocation.Budget(0.5)
    )
    assert set(alloc.values) == {('a', 'kernel'), ('b', 'kernel')}
    assert ranks[loud] >= 4 * max(ranks[quiet], 1), ranks
  ranks, _, _, _, _ = _gradient_allocation(
    {'a': 10.0, 'b': 0.1}, allocation.Budget(0.5, normalize='size')
  )
  assert abs(ranks['a'] - ranks['b']) <= 2, ranks


def test_allocated_ranks_beat_the_uniform_rank_at_equal_bits():
  """Same-shaped layers whose outputs matter 10x and 0.1x: the ranks the
  budget allocates give a lower output error than the uniform rank that
  spends the same bits (the sum of ranks is what both spend)."""
  ranks, alloc, _, _, quantize = _gradient_allocation(
    {'a': 10.0, 'b': 0.1}, allocation.Budget(0.5)
  )
  uniform = sum(ranks.values()) // 2
  err_alloc, _ = quantize()
  err_uniform, p = quantize(uniform)
  assert p['a']['kernel'].rank == p['b']['kernel'].rank == uniform
  assert err_alloc < 0.97 * err_uniform, (ranks, err_alloc, err_uniform)


def test_gradient_values_are_the_output_damage_removed():
  """y = (x W) diag(c): the output change of an error D is exactly
  ||X D diag(c)||^2, so the values of a weight's first r terms add up to
  the output energy ||X A_r B_r diag(c)||^2 / tokens of its factors
  (float32, unquantized), up to the gradient statistics' sampling."""
  c = np.linspace(0.1, 3.0, 128)
  ranks, alloc, params, x, _ = _gradient_allocation(
    {'a': c}, allocation.Budget(4.0), factor_dtype=jnp.float32
  )
  w = params['a']['kernel']
  r = ranks['a']
  assert 0 < r < 32
  ab = np.asarray(w.a, np.float64) @ np.asarray(w.b, np.float64)
  removed = np.sum(np.square(x.astype(np.float64) @ ab * c)) / len(x)
  assert np.sum(alloc.values[('a', 'kernel')][:r]) == pytest.approx(
    removed, rel=0.05
  )


def test_gradient_normalisation_needs_the_statistics(mlp):
  with pytest.raises(ValueError, match=r'up/kernel .*output_gradients'):
    _quantize(
      mlp,
      _rules(rank='auto'),
      budget_bits=allocation.Budget(0.5, normalize='gradient'),
    )


def test_decreasing_pools_rising_runs():
  got = allocation._decreasing(np.array([5, 1, 3, 2, 2, 4, 0.5]))
  np.testing.assert_allclose(got, [5, 2.4, 2.4, 2.4, 2.4, 2.4, 0.5])
  g = np.random.default_rng(0).random(50)
  got = allocation._decreasing(g)
  assert np.all(np.diff(got) <= 1e-12)
  assert np.sum(got) == pytest.approx(np.sum(g))
  np.testing.assert_array_equal(
    allocation._decreasing(np.sort(g)[::-1]), np.sort(g)[::-1]
  )


def test_allocated_and_quantized_checkpoints_round_trip(mlp, tmp_path):
  model, x, fp, _, _ = mlp
  rules = _rules(rank='auto', factor_qtype='int4')
  qmodel, params = _quantize(mlp, rules, budget_bits=0.75)
  checkpoint.save(str(tmp_path), params, {'m': 1})
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  assert abstract['up']['kernel'].rank == 0  # the template cannot know
  loaded = checkpoint.load(str(tmp_path), abstract, {'m': 1})
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
    qmodel.apply({'params': loaded}, x), qmodel.apply({'params': params}, x)
  )


@pytest.mark.parametrize('valuation', ['gradient', 'probe'])
def test_nnx_einsum_auto_rank_int8_factors(valuation):
  """Gemma's layouts under NNX: allocated ranks and int8 factors, terms
  valued by output gradients (the default) or by a probe."""

  class Attn(nnx.Module):
    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.qkv = nnx.Param(init(rngs.params(), (128, 4, 32)))
      self.o = nnx.Param(init(rngs.params(), (4, 32, 128)))

    def __call__(self, x):
      h = jnp.einsum('BTD,DNH->BTNH', x, self.qkv)
      return jnp.einsum('BTNH,NHD->BTD', jax.nn.gelu(h), self.o)

  x = jnp.asarray(
    reference.correlated_outlier_activations(np.random.default_rng(3), 256, 128)
  ).reshape(4, 64, 128)
  ref = Attn(nnx.Rngs(0))(x)
  rules = [
    LqerRule(
      module_path='.*',
      weight_qtype=jnp.int4,
      tile_size=32,
      rank='auto',
      method='qera',
      factor_qtype='int8',
    )
  ]
  make = lambda: Attn(nnx.Rngs(0))

  def apply(params, x):  # the probe's model: NNX params are a pure dict
    model = make()
    nnx.update(model, params)
    return model(x)

  if valuation == 'probe':
    budget = allocation.Budget(1.0, probe=probe_lib.OutputProbe(apply, [(x,)]))
    qmodel, fp, stats, alloc = nnx_flow.quantized(
      make, rules, x, budget_bits=budget, return_allocation=True
    )
    assert set(alloc.damage) == {('qkv',), ('o',)}
    assert len(alloc.chosen) == 3
  else:
    budget = allocation.Budget(1.0)
    qmodel, fp, stats, alloc = nnx_flow.quantized(
      make, rules, x, budget_bits=budget, gradients=True, return_allocation=True
    )
    assert 'sum_of_g2' in stats['qkv_lqer'] and not alloc.damage
  assert set(alloc.values) == {('qkv',), ('o',)}
  assert qmodel.o.a.dtype == jnp.int8 and qmodel.o.rank > 0
  assert alloc.ranks == {('qkv',): qmodel.qkv.rank, ('o',): qmodel.o.rank}
  y = nnx.jit(lambda m, x: m(x))(qmodel, x)
  ptq = nnx_flow.ptq(make, rules, x, fp, stats)
  assert _rel(y, ref) < 0.8 * _rel(ptq(x), ref)


# --------------------------------------------------------------- errors --


@pytest.mark.parametrize(
  'kw,field',
  [
    (dict(factor_qtype='int2'), 'factor_qtype'),
    (dict(max_rank=8), 'max_rank'),
    (dict(rank='auto', max_rank=0), 'max_rank'),
    (dict(refine_iters=-1), 'refine_iters'),
    (dict(rank='auto', refine_iters=1), 'refine_iters'),
    (dict(rank='max'), 'rank'),
  ],
)
def test_bad_settings_name_the_field(kw, field):
  with pytest.raises(ValueError, match=rf'\.{field}: '):
    LqerRule(
      **({'module_path': '.*', 'weight_qtype': jnp.int4, 'rank': 8} | kw)
    )


@pytest.mark.parametrize('bits', [float('nan'), float('inf'), -1.0, True])
def test_budget_must_be_a_finite_number(bits):
  with pytest.raises(ValueError, match='budget_bits must be a finite number'):
    allocation.Budget(bits)


def test_budget_and_auto_need_each_other(mlp):
  with pytest.raises(ValueError, match=r"up/kernel .*rank='auto'.*budget"):
    _quantize(mlp, _rules(rank='auto'))
  with pytest.raises(ValueError, match="no weight has a rule with rank='auto'"):
    _quantize(mlp, _rules(rank=8), budget_bits=1.0)
  with pytest.raises(ValueError, match='already spend'):
    _quantize(
      mlp,
      [
        dataclasses.replace(_rules(rank=128)[0], module_path='up'),
        *_rules(rank='auto'),
      ],
      budget_bits=0.1,
    )


@pytest.mark.parametrize('output', ['gaussian', 'softmax'])
def test_output_damage_estimates_the_first_order_output_change(
  mlp, ptq, output
):
  """Hutchinson's estimate (vjp with random cotangents) against the exact
  value from a jvp per weight and perturbation D: ||J_w D||^2 / ||f||^2, or
  with 'softmax' (f as logits) sum_t m_tᵀ (diag p_t - p_t p_tᵀ) m_t /
  positions, m = J_w D. Two perturbations per weight: its PTQ error, and a
  random one; `output_sensitivity` is the first."""
  model, x, fp, y_fp, _ = mlp
  ptq = ptq[1]
  apply = lambda p, b: model.apply({'params': p}, b)
  examples = x.reshape(16, -1, x.shape[-1])  # 16 examples of 48 rows
  names = ('up', 'mid', 'down')
  rng = np.random.default_rng(5)
  deltas = {}
  for name in names:
    w = fp[name]['kernel']
    d = qwix.dequantize(ptq[name]['kernel'].array).reshape(w.shape) - w
    deltas[(name, 'kernel')] = jnp.stack(
      [d, jnp.std(d) * rng.standard_normal(w.shape)]
    )
  probe = probe_lib.OutputProbe(apply, [(examples,)], probes=32, output=output)
  damage = probe_lib.output_damage(probe, fp, deltas)
  assert set(damage) == set(deltas)
  if output == 'gaussian':  # the same probe, one perturbation per weight
    sens = probe_lib.output_sensitivity(
      apply, fp, ptq, [(examples,)], probes=32, output=output
    )
    assert set(sens) == set(deltas)
    for path, value in sens.items():
      assert value == pytest.approx(damage[path][0], rel=1e-5)
  probs = np.asarray(jax.nn.softmax(y_fp, axis=-1), np.float64)
  for name in names:
    path = (name, 'kernel')
    for k in range(2):
      tangent = jax.tree.map(jnp.zeros_like, fp)
      tangent[name] = {'kernel': deltas[path][k]}
      _, moved = jax.jvp(lambda p: apply(p, x), (fp,), (tangent,))
      m = np.asarray(moved, np.float64)
      if output == 'gaussian':
        exact = np.sum(m * m) / np.sum(np.square(np.asarray(y_fp, np.float64)))
      else:
        fisher = np.sum(probs * m * m, -1) - np.square(np.sum(probs * m, -1))
        exact = np.mean(fisher)
      assert damage[path][k] == pytest.approx(exact, rel=0.2)


def test_output_damage_names_a_misshapen_perturbation(mlp):
  model, x, fp, _, _ = mlp
  probe = probe_lib.OutputProbe(
    lambda p, b: model.apply({'params': p}, b), [(x[None],)]
  )
  with pytest.raises(
    ValueError,
    match=r'mid/kernel has perturbations of'
    r' shape \(3, 3\)',
  ):
    probe_lib.output_damage(
      probe, fp, {('mid', 'kernel'): jnp.zeros((1, 3, 3))}
    )


def test_fitted_values_follow_the_measured_damage():
  """D(r) = D(0) F(r)^alpha measured at ranks 0, 5, 20 (F the objective's
  fraction left): alpha is recovered and the values telescope to the
  damage removed; damage that does not fall gives alpha's floor 0.1."""
  gains = 10.0 * 0.8 ** np.arange(32)
  err = 1.25 * gains.sum()
  left = 1 - np.concatenate([[0], np.cumsum(gains)]) / err
  for alpha in (0.5, 1.0, 2.5):
    damage = 3.0 * left[[0, 5, 20]] ** alpha
    values = allocation._fitted_values(gains, err, [0, 5, 20], damage)
    want = 3.0 * (left[:-1] ** alpha - left[1:] ** alpha)
    np.testing.assert_allclose(values, want, rtol=1e-9)
  flat = allocation._fitted_values(gains, err, [0, 5, 20], [3.0, 3.1, 3.0])
  np.testing.assert_allclose(flat, 3.0 * (left[:-1] ** 0.1 - left[1:] ** 0.1))
  assert not allocation._fitted_values(gains, err, [0, 5], [0.0, 0.0]).any()


def test_probed_allocation_measures_the_factors_it_cuts(mlp, ptq):
  """With Budget(probe=...), the damage is measured on each weight's own
  error left at ranks 0, the uniform rank and its largest: at rank 0 it is
  the PTQ error's (RTN is Qwix's PTQ) and it falls with the rank. Of the
  candidates from the allocation to the uniform rank, the one whose
  weights move the output least is kept, within the budget."""
  model, x, fp, y_fp, _ = mlp
  apply = lambda p, b: model.apply({'params': p}, b)
  batches = [(x.reshape(16, -1, x.shape[-1]),)]
  budget = allocation.Budget(0.5, probe=probe_lib.OutputProbe(apply, batches))
  _, (params, alloc) = _quantize(
    mlp,
    _rules(rank='auto', max_rank=64),
    budget_bits=budget,
    return_allocation=True,
  )
  sens = probe_lib.output_sensitivity(apply, fp, ptq[1], batches)
  n = sum(w.size for w in jax.tree.leaves(fp))
  assert 0.5 * n - 10240 < _extra_bits(mlp, ptq, params) <= 0.5 * n
  for path, (at, values) in alloc.damage.items():
    assert at == [0, 5, 64]
    assert values[0] == pytest.approx(sens[path], rel=1e-4)
    assert values[0] > values[1] > values[2]
  assert list(alloc.chosen) == [1.0, 0.5, 0.0]
  kept = min(alloc.chosen, key=alloc.chosen.get)
  f32 = qwix.quantize_model(
    model, LqerProvider(_rules(rank='auto'), compute_dtype=jnp.float32)
  )
  assert alloc.chosen[kept] == pytest.approx(
    _rel(f32.apply({'params': params}, x), y_fp) ** 2, rel=1e-3
  )
  assert alloc.ranks == {
    (p, 'kernel'): params[p]['kernel'].rank for p in ('up', 'mid', 'down')
  }
  assert not hasattr(alloc, 'params')  # the float params are not kept


def test_probe_distance_against_numpy(mlp):
  """KL(p_fp ‖ p_hat) per position ('softmax') and ||f_hat - f||^2 /
  ||f||^2 ('gaussian') when a weight is replaced, two batches."""
  model, x, fp, y_fp, _ = mlp
  apply = lambda p, b: model.apply({'params': p}, b)
  w = fp['mid']['kernel']
  w_hat = w + 0.05 * jnp.std(w) * jax.random.normal(KEY, w.shape)
  moved = jax.tree.map(lambda a: a, fp)
  moved['mid'] = {'kernel': w_hat}
  f = np.asarray(y_fp, np.float64)
  g = np.asarray(apply(moved, x), np.float64)
  log_p = (
    f
    - np.log(np.sum(np.exp(f - f.max(-1, keepdims=True)), -1, keepdims=True))
    - f.max(-1, keepdims=True)
  )
  log_q = (
    g
    - np.log(np.sum(np.exp(g - g.max(-1, keepdims=True)), -1, keepdims=True))
    - g.max(-1, keepdims=True)
  )
  want = {
    'softmax': np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1)),
    'gaussian': np.sum((g - f) ** 2) / np.sum(f**2),
  }
  for output, value in want.items():
    probe = probe_lib.OutputProbe(
      apply, [(x[:400],), (x[400:],)], output=output
    )
    got = probe.distance(fp, {('mid', 'kernel'): w_hat})
    assert got == pytest.approx(value, rel=1e-4)


def test_sensitivity_steers_the_allocation(mlp):
  paths = [('up', 'kernel'), ('mid', 'kernel'), ('down', 'kernel')]
  ranks = {}
  for favoured in ('up', 'down'):
    sens = {p: 1e3 if p[0] == favoured else 1e-3 for p in paths}
    _, params = _quantize(
      mlp,
      _rules(rank='auto', max_rank=64),
      budget_bits=allocation.Budget(0.5, sensitivity=sens),
    )
    ranks[favoured] = {p[0]: params[p[0]]['kernel'].rank for p in paths}
  # The favoured weight takes the budget (0.5 x 262144 bits) in ranks of
  # (in + out) x 16 bits: 10240 for up, 8192 for down; the 8192 bits up
  # leaves buy one rank of the next best weight that fits.
  assert ranks['up'] == {'up': 12, 'mid': 0, 'down': 1}
  assert ranks['down'] == {'up': 0, 'mid': 0, 'down': 16}


@pytest.mark.parametrize(
  'argv,message',
  [
    (['--budget', '0'], '--budget must be > 0'),
    (
      ['--budget', '1', '--act-bits', '4', '--methods', 'svdquant'],
      'svdquant rows take --ranks',
    ),
    (['--refine-iters', '-1'], '--refine-iters'),
    (['--calib-tokens', '64', '--plot', 'x.png'], 'two or more'),
  ],
)
def test_cli_refuses_bad_budget_settings_before_loading(argv, message):
  with pytest.raises(SystemExit, match=message):
    cli.main(['eval', '--model', 'minilm', *argv])
