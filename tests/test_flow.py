"""The core flows end to end: Linen and NNX, both abstract-tree flows."""

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
from models import NnxMLP
from models import NnxTransformer
from models import SimpleMLP
from models import Transformer
from tests import reference

KEY = jax.random.key(0)


def _rel(y, ref):
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def _linen(model, rules, x, provider=LqerProvider):
  qmodel = qwix.quantize_model(model, provider(rules))
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  return qmodel, abstract


def test_seed_readme_usage_runs_as_written():
  """Seed 002's usage example, apart from its import and model import."""
  model = SimpleMLP(dhidden=64, dout=10)
  key = jax.random.key(0)
  model_input = jax.random.normal(key, (1, 16))
  fp_params = model.init(key, model_input)['params']
  rules = [LqerRule(module_path='.*', weight_qtype=jnp.int4, rank=16)]
  lqer_model = qwix.quantize_model(model, LqerProvider(rules))
  temp_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abs_params = jax.eval_shape(temp_model.init, key, model_input)['params']
  lqer_params = lqer_quantize_params(fp_params, abs_params, rules)
  output = lqer_model.apply({'params': lqer_params}, model_input)
  assert output.shape == (1, 10)
  assert isinstance(lqer_params['Dense_0']['kernel'], lqer.WithLqer)
  # Both flows give the same params where the rank fits every weight.
  rules = [LqerRule(module_path='.*', weight_qtype=jnp.int4, rank=8)]
  _, abstract = _linen(model, rules, model_input)
  new_flow = lqer_quantize_params(fp_params, abstract)
  legacy = lqer_quantize_params(fp_params, abs_params, rules)
  for a, b in zip(jax.tree.leaves(new_flow), jax.tree.leaves(legacy)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('bits,group', [(8, None), (4, None), (4, 16)])
def test_one_layer_output_matches_numpy(bits, group):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(64, 32)).astype(np.float32)
  x = jnp.asarray(rng.normal(size=(5, 64)), jnp.float32)
  model = nn.Dense(32, use_bias=False)
  rules = [
    LqerRule(
      weight_qtype=f'int{bits}',
      tile_size=group,
      rank=6,
      solver='exact',
      factor_dtype=jnp.float32,
    )
  ]
  qmodel, abstract = _linen(model, rules, x)
  params = lqer_quantize_params({'kernel': jnp.asarray(w)}, abstract)
  y = qmodel.apply({'params': params}, x)
  # Ties at +-(qmax + 0.5) round differently under XLA's and NumPy's division,
  # so the base comes from Qwix itself; the rest is NumPy.
  deq = np.asarray(
    qwix.dequantize(
      qwix.quantize(
        jnp.asarray(w),
        f'int{bits}' if bits != 8 else jnp.int8,
        channelwise_axes=[1],
        tiled_axes={0: group} if group else None,
      )
    ),
    np.float64,
  )
  assert np.abs(deq - reference.quantize_symmetric(w, bits, group)).max() < (
    1.01 * np.abs(w).max() / (2 ** (bits - 1) - 0.5)
  )
  a, b = reference.svd_factors(w - deq, 6)
  stored = params['kernel']
  np.testing.assert_allclose(
    np.asarray(stored.a, np.float64) @ stored.b, a @ b, atol=1e-4
  )
  np.testing.assert_allclose(y, x @ deq + (x @ a) @ b, rtol=1e-4, atol=1e-4)


def test_full_rank_reconstructs_weight_to_factor_precision():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(24, 16)).astype(np.float32)
  x = jnp.eye(24)
  for dtype, tol in [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]:
    rules = [LqerRule(weight_qtype=jnp.int4, rank=16, factor_dtype=dtype)]
    qmodel, abstract = _linen(nn.Dense(16, use_bias=False), rules, x)
    params = lqer_quantize_params({'kernel': jnp.asarray(w)}, abstract)
    w_hat = qmodel.apply({'params': params}, x)  # identity input -> W_hat
    assert np.abs(w_hat - w).max() <= tol * np.abs(w).max()


@pytest.mark.parametrize('qtype', [jnp.int8, jnp.int4])
def test_beats_ptq_on_every_transformer_layer(qtype):
  """Output error on each layer's real input, LQER < PTQ, at int8 and int4."""
  model = Transformer()
  x = jax.random.normal(KEY, (2, 16, 16))
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(weight_qtype=qtype, rank=16)]
  stats_model = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  variables = stats_model.init(KEY, x)
  _, new = stats_model.apply(
    {'params': fp, **variables}, x, mutable='quant_stats'
  )
  _, abstract = _linen(model, rules, x)
  params = lqer_quantize_params(fp, abstract)
  rep = lqer.report(fp, params, new['quant_stats'])
  assert len(rep.layers) == 14
  for layer in rep.layers:
    assert layer.output_error < layer.output_error_base, layer


def test_error_non_increasing_in_rank_end_to_end():
  model = Transformer()
  x = jax.random.normal(KEY, (2, 16, 16))
  fp = model.init(KEY, x)['params']
  y_fp = model.apply({'params': fp}, x)
  prev = np.inf
  for rank in [None, 2, 8, 16]:
    rules = [LqerRule(weight_qtype=jnp.int4, rank=rank, solver='exact')]
    qmodel, abstract = _linen(model, rules, x)
    err = _rel(
      qmodel.apply({'params': lqer_quantize_params(fp, abstract, rules)}, x),
      y_fp,
    )
    assert err <= prev * 1.02, (rank, err, prev)
    prev = err


def test_jit_equals_eager_and_pass_is_deterministic():
  model = Transformer()
  x = jax.random.normal(KEY, (2, 8, 16))
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(weight_qtype=jnp.int4, tile_size=16, rank=8)]
  qmodel, abstract = _linen(model, rules, x)
  p1 = lqer_quantize_params(fp, abstract)
  p2 = lqer_quantize_params(fp, abstract)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    assert np.array_equal(a, b)
  eager = qmodel.apply({'params': p1}, x)
  jitted = jax.jit(qmodel.apply)({'params': p1}, x)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


class _Bf16MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(64, dtype=x.dtype)(x))
    return nn.Dense(10, dtype=x.dtype)(x)


def test_bf16_activations_and_act_quantization():
  model = _Bf16MLP()
  x = jax.random.normal(KEY, (4, 16))
  fp = model.init(KEY, x)['params']
  y_fp = model.apply({'params': fp}, x)
  for act_qtype in [None, jnp.int8]:
    rules = [LqerRule(weight_qtype=jnp.int4, act_qtype=act_qtype, rank=8)]
    qmodel, abstract = _linen(model, rules, x)
    params = lqer_quantize_params(fp, abstract)
    y16 = jax.jit(qmodel.apply)({'params': params}, x.astype(jnp.bfloat16))
    ptq_model, ptq_abs = _linen(model, rules, x, qwix.PtqProvider)
    ptq_params = qwix.quantize_params(fp, ptq_abs)
    # Same output dtype as Qwix PTQ (its f32 scales decide it).
    assert (
      y16.dtype
      == ptq_model.apply({'params': ptq_params}, x.astype(jnp.bfloat16)).dtype
    )
    assert _rel(y16.astype(jnp.float32), y_fp) < 0.1
    y_ptq = ptq_model.apply({'params': ptq_params}, x)
    y = qmodel.apply({'params': params}, x)
    assert _rel(y, y_fp) < _rel(y_ptq, y_fp)


@pytest.mark.parametrize(
  'qtype,calib',
  [
    (jnp.int8, 'absmax'),
    ('int3', 'absmax'),
    ('int2', 'absmax'),
    ('nf4', 'absmax'),
    (jnp.float8_e4m3fn, 'absmax'),
    (jnp.int4, 'absmax,0.9'),
    (jnp.int4, 'minmax'),
  ],
)
def test_qwix_weight_settings_keep_working(qtype, calib):
  model = SimpleMLP()
  x = jax.random.normal(KEY, (8, 16))
  fp = model.init(KEY, x)['params']
  y_fp = model.apply({'params': fp}, x)
  rules = [
    LqerRule(
      weight_qtype=qtype, weight_calibration_method=calib, tile_size=8, rank=8
    )
  ]
  qmodel, abstract = _linen(model, rules, x)
  ptq_model, ptq_abs = _linen(model, rules, x, qwix.PtqProvider)
  ptq_params = qwix.quantize_params(fp, ptq_abs)
  params = lqer_quantize_params(fp, abstract)
  # The base is exactly Qwix PTQ's.
  for path in [('Dense_0', 'kernel'), ('Dense_1', 'kernel')]:
    ours = params[path[0]][path[1]].array
    theirs = ptq_params[path[0]][path[1]].array
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_array_equal(a, b)
  err = _rel(qmodel.apply({'params': params}, x), y_fp)
  assert err < _rel(ptq_model.apply({'params': ptq_params}, x), y_fp)


def test_rank_none_is_plain_ptq_and_unmatched_pass_through():
  model = SimpleMLP()
  x = jax.random.normal(KEY, (4, 16))
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(module_path='Dense_0', weight_qtype=jnp.int4, rank=None)]
  qmodel, abstract = _linen(model, rules, x)
  params = lqer_quantize_params(fp, abstract)
  k0 = params['Dense_0']['kernel']
  assert type(k0) is qwix._src.providers.ptq.WithAux
  np.testing.assert_array_equal(
    params['Dense_1']['kernel'], fp['Dense_1']['kernel']
  )
  qmodel.apply({'params': params}, x)


@pytest.mark.parametrize(
  'kind', ['dense_general_in', 'dense_general_out', 'einsum', 'einsum_batch']
)
def test_multi_axis_kernels(kind):
  x = jax.random.normal(KEY, (3, 4, 8))
  model = {
    'dense_general_in': nn.DenseGeneral(12, axis=(-2, -1)),
    'dense_general_out': nn.DenseGeneral((3, 5)),
    'einsum': nn.Einsum((8, 6), 'btd,df->bft'),
    'einsum_batch': nn.Einsum((4, 8, 6), 'btd,tdf->btf'),
  }[kind]
  fp = model.init(KEY, x)['params']
  y_fp = model.apply({'params': fp}, x)
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4, solver='exact')]
  qmodel, abstract = _linen(model, rules, x)
  params = lqer_quantize_params(fp, abstract)
  y = jax.jit(qmodel.apply)({'params': params}, x)
  ptq_model, ptq_abs = _linen(model, rules, x, qwix.PtqProvider)
  y_ptq = ptq_model.apply({'params': qwix.quantize_params(fp, ptq_abs)}, x)
  assert y.shape == y_fp.shape
  assert _rel(y, y_fp) < _rel(y_ptq, y_fp)
  # Full rank recovers the float output (per batch slice for batch axes).
  full = params['kernel'].layout.max_rank
  rules = [
    LqerRule(
      weight_qtype=jnp.int4, rank=full, solver='exact', factor_dtype=jnp.float32
    )
  ]
  qmodel, abstract = _linen(model, rules, x)
  y_full = qmodel.apply({'params': lqer_quantize_params(fp, abstract)}, x)
  np.testing.assert_allclose(y_full, y_fp, atol=1e-4)


def test_nnx_both_flows_and_jit():
  x = jax.random.normal(KEY, (2, 8, 16))
  model = NnxTransformer(rngs=nnx.Rngs(0))
  rules = [LqerRule(weight_qtype=jnp.int4, tile_size=16, rank=8)]
  y_fp = model(x)
  fp = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  abstract = nnx.eval_shape(
    lambda: qwix.quantize_model(model, LqerProvider(rules), x)
  )
  nnx.update(abstract, lqer_quantize_params(fp, abstract))
  y = nnx.jit(lambda m, x: m(x))(abstract, x)
  np.testing.assert_allclose(y, abstract(x), rtol=1e-5, atol=1e-5)
  # Implicit quantization by quantize_model on real weights: same factors.
  implicit = qwix.quantize_model(model, LqerProvider(rules), x)
  np.testing.assert_allclose(implicit(x), y, rtol=1e-4, atol=1e-4)
  # Legacy flow: PtqProvider abstract + rules.
  ptq_abs = nnx.eval_shape(
    lambda: qwix.quantize_model(model, qwix.PtqProvider(rules), x)
  )
  legacy = lqer_quantize_params(fp, ptq_abs, rules)
  nnx.update(abstract, legacy)
  np.testing.assert_allclose(abstract(x), y, rtol=1e-6, atol=1e-6)
  ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules), x)
  assert _rel(y, y_fp) < _rel(ptq_model(x), y_fp)


def test_nnx_mlp_seed_style():
  x = jax.random.normal(KEY, (4, 16))
  model = NnxMLP(16, 64, 10, rngs=nnx.Rngs(0))
  rules = [LqerRule(weight_qtype=jnp.int4, rank=8)]
  abstract = nnx.eval_shape(
    lambda: qwix.quantize_model(model, LqerProvider(rules), x)
  )
  nnx.update(
    abstract,
    lqer_quantize_params(
      nnx.to_pure_dict(nnx.state(model, nnx.Param)), abstract
    ),
  )
  assert isinstance(abstract.fc1.kernel, lqer.WithLqer)
  assert _rel(abstract(x), model(x)) < 0.1


def test_rank_too_large_names_path_and_sizes():
  model = SimpleMLP(dhidden=64, dout=10)
  x = jnp.ones((1, 16))
  rules = [LqerRule(weight_qtype=jnp.int4, rank=12)]
  with pytest.raises(
    ValueError, match=r'Dense_1/kernel: rank 12 .* 64 x 10.*<= 10'
  ):
    _linen(model, rules, x)
  fp = model.init(KEY, x)['params']
  # The earlier project's flow (rules + PtqProvider tree) clips, with a
  # warning naming the weight and both sizes.
  _, ptq_abs = _linen(model, rules, x, qwix.PtqProvider)
  with pytest.warns(UserWarning, match=r'Dense_1/kernel: rank 12 .*64 x 10'):
    params = lqer_quantize_params(fp, ptq_abs, rules)
  assert params['Dense_1']['kernel'].rank == 10
  assert params['Dense_0']['kernel'].rank == 12


def test_nan_weight_is_rejected_with_path():
  model = SimpleMLP()
  x = jnp.ones((1, 16))
  fp = model.init(KEY, x)['params']
  fp['Dense_0']['kernel'] = fp['Dense_0']['kernel'].at[3, 2].set(jnp.nan)
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4)]
  _, abstract = _linen(model, rules, x)
  with pytest.raises(ValueError, match='Dense_0/kernel: weight holds 1 NaN'):
    lqer_quantize_params(fp, abstract)


def test_missing_param_in_abstract_tree():
  model = SimpleMLP()
  x = jnp.ones((1, 16))
  fp = model.init(KEY, x)['params']
  fp['extra'] = {'kernel': jnp.ones((2, 2))}
  _, abstract = _linen(model, [LqerRule(weight_qtype=jnp.int4, rank=4)], x)
  with pytest.raises(ValueError, match='extra'):
    lqer_quantize_params(fp, abstract)
  out = lqer_quantize_params(fp, abstract, allow_extra_params=True)
  assert 'extra' not in out


@pytest.mark.parametrize(
  'kwargs,field',
  [
    ({'rank': 0}, 'rank'),
    ({'rank': -3}, 'rank'),
    ({'rank': 2.5}, 'rank'),
    ({'rank': 4, 'weight_qtype': None}, 'rank'),
    ({'method': 'pca'}, 'method'),
    ({'solver': 'lanczos'}, 'solver'),
    ({'factor_dtype': jnp.int8}, 'factor_dtype'),
    ({'weight_qtype': 'int33'}, 'weight_qtype'),
    ({'tile_size': -4}, 'tile_size'),
    ({'weight_calibration_method': 'median'}, 'weight_calibration_method'),
    ({'weight_calibration_method': 'absmax,x'}, 'weight_calibration_method'),
    ({'qera_damping': -1.0}, 'qera_damping'),
    (
      {'weight_qtype': 'int2', 'weight_calibration_method': 'minmax'},
      'weight_calibration_method',
    ),
  ],
)
def test_invalid_rule_settings(kwargs, field):
  settings = {'weight_qtype': jnp.int4, 'rank': 4} | kwargs
  with pytest.raises(ValueError, match=rf'LqerRule\(.*\)\.{field}'):
    LqerRule(**settings)


def test_qera_factors_each_input_once(monkeypatch):
  """q/k/v read the same input: one Cholesky of E[x^T x] serves all three."""
  model = Transformer()
  x = jax.random.normal(KEY, (2, 16, 16))
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(weight_qtype=jnp.int4, rank=4, method='qera')]
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  stats = cal.init(KEY, x)['quant_stats']
  _, new = cal.apply(
    {'params': fp, 'quant_stats': stats}, x, mutable='quant_stats'
  )
  calls = []
  original = lqer.core.decompose.damped_cholesky
  monkeypatch.setattr(
    lqer.core.decompose,
    'damped_cholesky',
    lambda r, d: calls.append(r.shape) or original(r, d),
  )
  _, abstract = _linen(model, rules, x)
  params = lqer_quantize_params(fp, abstract, calibration=new['quant_stats'])
  # 14 weights, 10 distinct inputs: embed, head, and per block qkv/out/fc1/fc2.
  assert len(calls) == 10
  assert isinstance(params['block_0']['key']['kernel'], lqer.WithLqer)


@pytest.mark.parametrize(
  'compute_dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]
)
def test_lqer_matmul_path_matches_qwix_path(compute_dtype, tol):
  """lqer's dequantize-at-use matmul computes what Qwix's path does."""
  model = Transformer()
  x = jax.random.normal(KEY, (2, 8, 16))
  fp = model.init(KEY, x)['params']
  rules = [LqerRule(weight_qtype=jnp.int4, tile_size=16, rank=8)]
  _, abstract = _linen(model, rules, x)
  params = lqer_quantize_params(fp, abstract)
  qwix_path = qwix.quantize_model(
    model, LqerProvider(rules, compute_dtype=None)
  )
  ref = qwix_path.apply({'params': params}, x)
  fast = qwix.quantize_model(
    model, LqerProvider(rules, compute_dtype=compute_dtype)
  )
  y = jax.jit(fast.apply)({'params': params}, x)
  assert y.dtype == ref.dtype
  assert _rel(y, ref) < tol


def test_forward_does_not_hold_every_dequantized_weight():
  """XLA hoists Qwix's dequantizations; lqer's matmul keeps ~1 layer live."""

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(6):
        x = x + nn.Dense(256, use_bias=False)(
          nn.relu(nn.Dense(512, use_bias=False)(x))
        )
      return x

  model = Stack()
  x = jnp.ones((1, 256))
  fp = model.init(KEY, x)['params']
  fp_bytes = sum(w.nbytes for w in jax.tree.leaves(fp))
  rules = [LqerRule(weight_qtype=jnp.int4, tile_size=128, rank=8)]
  _, abstract = _linen(model, rules, x)
  params = lqer_quantize_params(fp, abstract)

  def temp_ratio(compute_dtype, params=params):
    m = qwix.quantize_model(
      model, LqerProvider(rules, compute_dtype=compute_dtype)
    )
    compiled = (
      jax.jit(lambda p, x: m.apply({'params': p}, x)).lower(params, x).compile()
    )
    return compiled.memory_analysis().temp_size_in_bytes / fp_bytes

  assert temp_ratio(None) > 0.9  # Qwix's path: every weight in float32
  at_use = temp_ratio(jnp.float32)
  assert at_use < 0.25
  # Packed: one block of one weight at a time (here a block is a weight).
  assert temp_ratio(jnp.float32, lqer.pack_params(params)) <= at_use
