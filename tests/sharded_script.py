"""Run by tests/test_sharding.py in a subprocess with 8 host devices."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)

import math  # pylint: disable=g-import-not-at-top
import re  # pylint: disable=g-import-not-at-top

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import qwix
from qwix._src.core import qarray

import lqer


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    part = lambda names: nn.with_partitioning(
      nn.initializers.lecun_normal(), names
    )
    x = nn.Dense(256, use_bias=False, kernel_init=part(('data', 'model')))(x)
    return nn.Dense(64, use_bias=False, kernel_init=part(('model', 'data')))(x)


def main():
  assert len(jax.devices()) == 8
  mesh = jax.make_mesh(
    (2, 4), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  model = Model()
  x = jax.random.normal(jax.random.key(0), (8, 128))
  variables = model.init(jax.random.key(0), x)
  specs = nn.get_partition_spec(variables)['params']
  local = nn.unbox(variables['params'])
  sharded = jax.tree.map(
    lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), local, specs
  )
  rules = [lqer.LqerRule(weight_qtype=jnp.int4, tile_size=32, rank=8)]
  qmodel = qwix.quantize_model(model, lqer.LqerProvider(rules))
  abstract = nn.unbox(
    jax.eval_shape(qmodel.init, jax.random.key(0), x)['params']
  )
  params = lqer.lqer_quantize_params(sharded, abstract)
  reference = lqer.lqer_quantize_params(local, abstract)
  k0, k1 = params['Dense_0']['kernel'], params['Dense_1']['kernel']
  # A follows W's input sharding, B its output sharding, rank replicated.
  assert k0.a.sharding.spec == P('data', None), k0.a.sharding
  assert k0.b.sharding.spec == P(None, 'model'), k0.b.sharding
  assert k1.a.sharding.spec == P('model', None), k1.a.sharding
  assert k1.b.sharding.spec == P(None, 'data'), k1.b.sharding
  assert k0.array.qvalue.sharding.spec == P('data', 'model')
  for name in ['Dense_0', 'Dense_1']:
    got, want = params[name]['kernel'], reference[name]['kernel']
    for a, b in zip(jax.tree.leaves(got.array), jax.tree.leaves(want.array)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Sharded reductions sum in another order: same factors up to bf16.
    ab = np.asarray(got.a, np.float32) @ np.asarray(got.b, np.float32)
    ab_ref = np.asarray(want.a, np.float32) @ np.asarray(want.b, np.float32)
    assert np.linalg.norm(ab - ab_ref) < 1e-2 * np.linalg.norm(ab_ref)
  y = jax.jit(qmodel.apply)({'params': params}, x)
  y_single = qmodel.apply({'params': reference}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_single), atol=1e-3)
  check_lora_conversion_keeps_sharding(model, rules, params, x, y)
  check_svdquant_sharded(model, sharded, local, x)
  w = jax.random.normal(jax.random.key(1), (512, 1024))
  check_factorization_does_not_gather_weight(
    jax.device_put(w, sharded['Dense_0']['kernel'].sharding)
  )
  print('SHARDING OK')


def check_lora_conversion_keeps_sharding(model, rules, params, x, y):
  """lqer.to_lora on sharded params: adapters boxed with the logical names
  Qwix gives its own, sharded as the factors, same output under jit."""
  lrules = lqer.lora_rules(rules, 16.0)
  lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider(lrules))
  lora_abstract = jax.eval_shape(lora_model.init, jax.random.key(0), x)[
    'params'
  ]
  lora = lqer.to_lora(params, lora_abstract, lrules)
  a0 = lora['Dense_0']['kernel_lora_a']
  assert a0.names == lora_abstract['Dense_0']['kernel_lora_a'].names
  assert a0.names == ('data', None), a0.names
  lora = nn.unbox(lora)
  assert lora['Dense_0']['kernel_lora_a'].sharding.spec == P('data', None)
  assert lora['Dense_1']['kernel_lora_b'].sharding.spec == P(None, 'data')
  y_lora = jax.jit(lora_model.apply)({'params': lora}, x)
  np.testing.assert_allclose(np.asarray(y_lora), np.asarray(y), atol=1e-4)


def check_svdquant_sharded(model, sharded, local, x):
  """SVDQuant W4A8 from sharded float params, run under jit: the same
  smoothing and output error as from unsharded ones, factors sharded as
  W."""
  rules = [
    lqer.LqerRule(
      weight_qtype=jnp.int4,
      act_qtype=jnp.int8,
      tile_size=32,
      rank=8,
      method='svdquant',
    )
  ]
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  _, stats = cal.apply(
    {'params': local, **cal.init(jax.random.key(0), x)},
    x,
    mutable='quant_stats',
  )
  qmodel = qwix.quantize_model(model, lqer.LqerProvider(rules))
  abstract = nn.unbox(
    jax.eval_shape(qmodel.init, jax.random.key(0), x)['params']
  )
  params = lqer.lqer_quantize_params(
    sharded, abstract, calibration=stats['quant_stats']
  )
  single = lqer.lqer_quantize_params(
    local, abstract, calibration=stats['quant_stats']
  )
  k0 = params['Dense_0']['kernel']
  np.testing.assert_allclose(
    k0.input_scale, single['Dense_0']['kernel'].input_scale, rtol=1e-6
  )
  assert k0.a.sharding.spec == P('data', None), k0.a.sharding
  # Random weights have flat spectra, so the top-8 subspace (and with it
  # the residual's rounding) moves with the summation order: compare each
  # run's error against the float model.
  y_fp = model.apply({'params': local}, x)
  rel = lambda y: float(jnp.linalg.norm(y - y_fp) / jnp.linalg.norm(y_fp))
  err = rel(jax.jit(qmodel.apply)({'params': params}, x))
  err_single = rel(qmodel.apply({'params': single}, x))
  assert 0 < err < 0.2 and abs(err - err_single) < 0.1 * err_single, (
    err,
    err_single,
  )


def _largest_all_gather(hlo: str) -> int:
  """Elements of the largest all-gather result in an optimized HLO text."""
  largest = 0
  for line in hlo.splitlines():
    if 'all-gather' not in line or '=' not in line:
      continue
    result = line.split('=', 1)[1]
    for dims in re.findall(
      r'[a-z0-9]+\[([0-9,]*)\]', result.split('all-gather')[0]
    ):
      largest = max(largest, math.prod(int(d) for d in dims.split(',') if d))
  return largest


def check_factorization_does_not_gather_weight(w):
  """The randomized solver (default settings) works on W's shards: the
  largest all-gather is the thin Q^T E (1024 x 7 blocks of 24 columns);
  the exact SVD needs the whole error matrix on one device."""
  ws = jnp.stack([w])
  keys = jnp.stack([jax.random.key(0)])
  layout = lqer.core.layout.KernelLayout(w.shape, (0,), ())
  sizes = {}
  how = qarray.HowToQuantize(
    qtype=jnp.int4,
    channelwise_axes=[1],
    tiled_axes={},
    calibration_method='absmax',
  )
  q, _ = lqer.quant.bases.rtn(w, how, layout, None)
  qs = jax.tree.map(lambda x: jnp.stack([x]), q)
  for solver in ['randomized', 'exact']:
    rule = lqer.LqerRule(weight_qtype=jnp.int4, rank=8, solver=solver)
    # E and the factors, as lqer_quantize_params runs them.
    fn = lqer.quant.factor.factor_fn(layout, 8, rule)
    hlo = fn.lower(ws, qs, None, keys).compile().as_text()
    sizes[solver] = _largest_all_gather(hlo)
  print('largest all-gather (elements):', sizes, 'weight:', w.size)
  assert sizes['randomized'] <= max(w.shape) * 7 * 24 < w.size // 2, sizes
  assert sizes['exact'] >= w.size, sizes


if __name__ == '__main__':
  main()
