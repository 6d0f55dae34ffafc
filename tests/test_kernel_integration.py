"""LqerProvider's packed int4 weights on lqer's CPU kernel (int4_kernel
'ffi': one FFI call per weight, branch, input scale and int8 activation
quantization included) against the XLA packed path ('xla'), every layout
pack_params packs, group sizes, token counts, factor dtypes, W4A8, jit,
vmap, several devices, and the fallback when the kernel is absent."""

import functools
import os
import subprocess
import sys
import textwrap
import warnings
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

import lqer
from lqer.kernels import ffi
from lqer.quant import packing
from models import Transformer
from tests.test_packing import GemmaLinenBlock

KEY = jax.random.key(0)
needs_kernel = pytest.mark.skipif(
  not ffi.available(), reason=str(ffi.unavailable_reason())
)


def _rel(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def _with_input_scale(params):
  """Every LQER weight with a per-input-channel scale s in [0.5, 2] (as
  SVDQuant's lam or AWQ's scale: the main product reads x / s)."""

  def scaled(path, leaf):
    if not isinstance(leaf, lqer.WithLqer):
      return leaf
    n_in = leaf.layout.in_size
    seed = zlib.crc32(jax.tree_util.keystr(path).encode())
    s = jax.random.uniform(jax.random.key(seed), (n_in,), minval=0.5, maxval=2)
    return leaf.replace(input_scale=s)

  return jax.tree_util.tree_map_with_path(
    scaled, params, is_leaf=lambda v: isinstance(v, lqer.WithLqer)
  )


def _packed(model, x, rules=None, input_scale=False, **rule_kw):
  """(apply(kernel, x), packed params) of `model` under LQER int4 rules
  (`rules`, else one rule for every module from rule_kw)."""
  fp = model.init(KEY, x)['params']
  rules = rules or [
    lqer.LqerRule(
      **{
        'module_path': '.*',
        'weight_qtype': 'int4',
        'tile_size': 32,
        'rank': 32,
        **rule_kw,
      }
    )
  ]
  abstract = jax.eval_shape(
    qwix.quantize_model(model, lqer.LqerProvider(rules)).init, KEY, x
  )['params']
  params = lqer.lqer_quantize_params(fp, abstract)
  if input_scale:
    params = _with_input_scale(params)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # weights that stay unpacked are listed
    packed = lqer.pack_params(params)
  models = {
    k: qwix.quantize_model(
      model,
      lqer.LqerProvider(rules, compute_dtype=jnp.float32, int4_kernel=k),
    )
    for k in ('ffi', 'xla')
  }
  jitted = {k: jax.jit(m.apply) for k, m in models.items()}
  return lambda kernel, x: jitted[kernel]({'params': packed}, x), packed


class Mixed(nn.Module):
  """Sizes off the SIMD width and every group kind, each layer on (a slice
  of) the input, not chained, so both paths see the same inputs: Dense with
  1031 rows (per-channel), 576 rows (groups of 64), DenseGeneral to (4, 32)
  (512 rows, groups of 128), DenseGeneral contracting (4, 32) (128 rows,
  groups of 16 along the 32-axis: packed rows reordered to (32, 4)).
  Outputs flattened and concatenated: (..., 1280)."""

  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=False, dtype=self.dtype)
    lead = x.shape[:-1]
    ys = [
      nn.Dense(576, name='rows1031', **kw)(x),
      nn.Dense(512, name='rows576', **kw)(x[..., :576]),
      nn.DenseGeneral((4, 32), name='heads', **kw)(x[..., :512]),
      nn.DenseGeneral(64, axis=(-2, -1), name='proj', **kw)(
        x[..., :128].reshape(*lead, 4, 32)
      ),
    ]
    return jnp.concatenate([y.reshape(*lead, -1) for y in ys], -1)


MIXED_TILES = {'rows1031': None, 'rows576': 64, 'heads': 128, 'proj': 16}
# name: (rule fields, input_scale); rank None: plain Qwix PTQ weights.
MIXED_CONFIGS = {
  'ptq': (dict(rank=None), False),
  'r32': (dict(rank=32), False),
  'r32-f32-factors': (dict(rank=32, factor_dtype=jnp.float32), False),
  'r32-int8-factors': (dict(rank=32, factor_qtype='int8'), False),
  'r32-int4-factors': (dict(rank=32, factor_qtype='int4'), False),
  'r32-input-scale': (dict(rank=32), True),
  'w4a8-ptq': (dict(rank=None, act_qtype='int8'), False),
  'w4a8-r32-input-scale': (dict(rank=32, act_qtype='int8'), True),
}


@functools.lru_cache(maxsize=None)
def _mixed(config, dtype):
  fields, input_scale = MIXED_CONFIGS[config]
  rules = [
    lqer.LqerRule(
      module_path=name, weight_qtype='int4', tile_size=tile, **fields
    )
    for name, tile in MIXED_TILES.items()
  ]
  x0 = jnp.ones((1, 1, 1031))
  return _packed(Mixed(dtype=dtype), x0, rules, input_scale)


# (config, batch x tokens, activation dtype): every token count for the
# main configs, one and 17 tokens for the others.
MIXED_CASES = [
  *[
    ('r32', bt, dt)
    for bt in ((1, 1), (1, 17), (2, 63), (1, 128), (8, 128))
    for dt in (jnp.float32, jnp.bfloat16)
  ],
  *[
    ('w4a8-r32-input-scale', bt, jnp.float32)
    for bt in ((1, 1), (1, 17), (1, 128), (8, 128))
  ],
  ('w4a8-r32-input-scale', (1, 17), jnp.bfloat16),
  *[
    (c, bt, jnp.float32)
    for c in MIXED_CONFIGS
    if c not in ('r32', 'w4a8-r32-input-scale')
    for bt in ((1, 1), (1, 17))
  ],
]


@needs_kernel
@pytest.mark.parametrize('config, bt, dtype', MIXED_CASES)
def test_mixed_sizes_and_groups_match_the_xla_path(config, bt, dtype):
  """The kernel (branch, input scale and int8 activations in the call)
  equals the XLA packed path to float32 rounding; with bfloat16 activations
  and an input scale s, its branch reads the bfloat16 x / s times s (s
  folded into A), within ~2^-9 of x on the branch term."""
  apply, packed = _mixed(config, None if dtype == jnp.float32 else dtype)
  for name in MIXED_TILES:
    assert isinstance(packed[name]['kernel'].array, lqer.PackedInt4)
  x = jax.random.normal(KEY, (*bt, 1031)).astype(dtype)
  y, ref = apply('ffi', x), apply('xla', x)
  assert y.shape == ref.shape == (*bt, 1280)
  scaled_bf16 = MIXED_CONFIGS[config][1] and dtype == jnp.bfloat16
  assert _rel(y, ref) < (1e-4 if scaled_bf16 else 1e-5)


@needs_kernel
@pytest.mark.parametrize(
  'rank, factor_qtype', [(None, None), (8, None), (8, 'int8')]
)
@pytest.mark.parametrize('tokens', [1, 17, 128])
def test_dense_and_dense_general_match_the_xla_path(rank, factor_qtype, tokens):
  """Transformer: Dense and multi-axis DenseGeneral kernels (attention
  output contracts two axes), PTQ / rank 8 / int8 factors (rank 32 on
  the Gemma block below)."""
  x = jax.random.normal(KEY, (1, tokens, 16))
  apply, packed = _packed(
    Transformer(), x, rank=rank, factor_qtype=factor_qtype, tile_size=16
  )
  assert any(
    isinstance(l, lqer.PackedInt4)
    for l in jax.tree.leaves(
      packed, is_leaf=lambda v: isinstance(v, lqer.PackedInt4)
    )
  )
  assert _rel(apply('ffi', x), apply('xla', x)) < 1e-5


@needs_kernel
def test_auto_bf16_from_64_tokens_is_closer_than_the_xla_path():
  """compute_dtype 'auto' at 128 tokens: both paths multiply bfloat16
  activations; the kernel keeps q exact and scales in float32 (the XLA path
  rounds q * scale to bfloat16), so it is at least as close to the float32
  compute."""
  _, packed = _mixed('r32', None)
  rules = [
    lqer.LqerRule(module_path=name, weight_qtype='int4', tile_size=t, rank=32)
    for name, t in MIXED_TILES.items()
  ]
  x = jax.random.normal(KEY, (1, 128, 1031))
  ys = {}
  for cd, kernel in (('auto', 'ffi'), ('auto', 'xla'), (jnp.float32, 'ffi')):
    model = qwix.quantize_model(
      Mixed(), lqer.LqerProvider(rules, compute_dtype=cd, int4_kernel=kernel)
    )
    ys[cd == 'auto', kernel] = jax.jit(model.apply)({'params': packed}, x)
  ref = ys[False, 'ffi']
  err_kernel, err_xla = _rel(ys[True, 'ffi'], ref), _rel(ys[True, 'xla'], ref)
  assert 1e-4 < err_kernel <= err_xla < 1e-2  # bfloat16 x, not float32


@needs_kernel
@pytest.mark.parametrize(
  'dtype, bt',
  [
    (jnp.float32, (2, 9)),
    (jnp.bfloat16, (2, 9)),
    (jnp.float32, (1, 1)),
  ],
)
def test_gemma_einsums_match_the_xla_path(dtype, bt):
  """Gemma's einsums (contraction not on leading axes, two contracting
  axes, a stacked gate/up kernel), rank 32, g32. (W4A8 is checked layer by
  layer above: chained through attention, one int8 rounding flipped by a
  float32 ulp upstream moves the output by ~1e-3.)"""
  x = jax.random.normal(KEY, (*bt, 384)).astype(dtype)
  apply, _ = _packed(GemmaLinenBlock(), x.astype(jnp.float32))
  assert _rel(apply('ffi', x), apply('xla', x)) < 1e-5


def _hlo(model, rules, x):
  """The optimized HLO of `model`'s jitted apply on packed params."""
  fp = model.init(KEY, x)['params']
  qmodel = qwix.quantize_model(model, lqer.LqerProvider(rules))
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  packed = lqer.pack_params(lqer.lqer_quantize_params(fp, abstract))
  return jax.jit(qmodel.apply).lower({'params': packed}, x).compile().as_text()


@needs_kernel
@pytest.mark.parametrize(
  'act, target',
  [(None, ffi.TARGET_F32), ('int8', ffi.TARGET_A8), ('int4', ffi.TARGET_F32)],
)
def test_one_kernel_call_per_weight(act, target):
  """'auto' on CPU: the branch, x / s and int8 activation quantization run
  in the one FFI call (no XLA dot is left); int4 activations are
  quantized in XLA and run the float path, the branch then XLA dots."""
  rules = [
    lqer.LqerRule(
      module_path='.*',
      weight_qtype='int4',
      tile_size=64,
      rank=32,
      act_qtype=act,
    )
  ]
  x = jax.random.normal(KEY, (1, 5, 576))
  hlo = _hlo(nn.Dense(128, use_bias=False), rules, x)
  assert hlo.count(f'custom_call_target="{target}"') == 1
  assert hlo.count(' dot(') == (2 if act == 'int4' else 0)  # x A, then B


@needs_kernel
@pytest.mark.parametrize('tile', [None, 64])
def test_w4a8_equals_qwix_quantized_matmul(tile):
  """The kernel's int8 path against Qwix's own W4A8 matmul (unpacked
  params, compute_dtype=None), float32: the same dynamic int8 scales and
  integers, to float rounding."""
  model = nn.Dense(64, use_bias=False)
  x = jax.random.normal(KEY, (1, 17, 576))
  fp = model.init(KEY, x)['params']
  rules = [
    lqer.LqerRule(
      module_path='.*',
      weight_qtype='int4',
      tile_size=tile,
      rank=8,
      act_qtype='int8',
    )
  ]
  qwix_model = qwix.quantize_model(
    model, lqer.LqerProvider(rules, compute_dtype=None)
  )
  abstract = jax.eval_shape(qwix_model.init, KEY, x)['params']
  params = lqer.lqer_quantize_params(fp, abstract)
  ref = jax.jit(qwix_model.apply)({'params': params}, x)
  kernel_model = qwix.quantize_model(
    model, lqer.LqerProvider(rules, int4_kernel='ffi')
  )
  y = jax.jit(kernel_model.apply)({'params': lqer.pack_params(params)}, x)
  assert _rel(y, ref) < 1e-5


@needs_kernel
def test_vmap_over_a_batch_matches_the_xla_path():
  x = jax.random.normal(KEY, (3, 2, 5, 16))
  apply, _ = _packed(Transformer(), x[0], rank=8, tile_size=16)
  ys = {k: jax.vmap(lambda b, k=k: apply(k, b))(x) for k in ('ffi', 'xla')}
  assert _rel(ys['ffi'], ys['xla']) < 1e-5


SHARDED_SCRIPT = """
import warnings
import jax, jax.numpy as jnp, numpy as np, qwix, lqer
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

mesh = jax.make_mesh((2,), ('d',), axis_types=(jax.sharding.AxisType.Auto,))
model = nn.Dense(64, use_bias=False)
x = jax.random.normal(jax.random.key(0), (4, 5, 128))
rules = [lqer.LqerRule(module_path='.*', weight_qtype='int4', rank=8,
                       tile_size=32)]
prov = lambda k: qwix.quantize_model(
  model, lqer.LqerProvider(rules, int4_kernel=k))
fp = model.init(jax.random.key(1), x)['params']
abstract = jax.eval_shape(prov('xla').init, jax.random.key(0), x)['params']
w = lqer.pack_params(lqer.lqer_quantize_params(fp, abstract))['kernel']
col = lambda v: jax.device_put(v, NamedSharding(mesh, P(None, 'd')))
rep = lambda v: jax.device_put(v, NamedSharding(mesh, P()))
arr = w.array.replace(packed=col(w.array.packed), scale=col(w.array.scale))
params = {'kernel': w.replace(array=arr, a=rep(w.a), b=col(w.b))}
xs = jax.device_put(x, NamedSharding(mesh, P('d')))
ys = {}
for k in ('auto', 'ffi', 'xla'):
  apply = jax.jit(prov(k).apply)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    ys[k] = np.asarray(apply({'params': params}, xs))
  hlo = apply.lower({'params': params}, xs).compile().as_text()
  print('path', k, 'kernel' if 'lqer_int4_matmul' in hlo else 'xla',
        '|'.join(str(c.message) for c in caught
                 if str(c.message).startswith('lqer')))
ref = np.asarray(ys['xla'])
for k in ('auto', 'ffi'):
  print('err', k, float(np.abs(ys[k] - ref).max() / np.abs(ref).max()))
"""


@needs_kernel
def test_several_devices_auto_takes_xla_and_ffi_gathers():
  """Two forced host devices, the weight sharded along its columns and x
  along the batch: 'auto' runs the XLA path, saying why once; 'ffi' runs
  the kernel (XLA gathers its operands) and gives the same outputs."""
  flags = os.environ.get('XLA_FLAGS', '')
  env = dict(
    os.environ, XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count=2'
  )
  out = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(SHARDED_SCRIPT)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  said = {
    tuple(line.split(' ', 2)[:2]): line.split(' ', 2)[2]
    for line in out.stdout.splitlines()
  }
  assert said['path', 'auto'].startswith('xla lqer: 2 devices: the int4 CPU')
  assert said['path', 'ffi'] == 'kernel '
  assert said['path', 'xla'] == 'xla '
  assert float(said['err', 'auto']) == 0
  assert float(said['err', 'ffi']) < 1e-5


def test_without_the_kernel_auto_falls_back_once_and_ffi_refuses(monkeypatch):
  """Simulated absence: 'auto' runs the XLA path with one warning naming
  why; 'ffi' raises naming why; other backends take 'xla' without asking."""
  monkeypatch.setattr(ffi, 'available', lambda: False)
  monkeypatch.setattr(ffi, 'unavailable_reason', lambda: 'no compiler here')
  monkeypatch.setattr(packing, '_FALLBACK_WARNED', [])
  with pytest.warns(UserWarning, match='no compiler here'):
    assert packing.resolve_kernel('auto') == 'xla'
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # said once
    assert packing.resolve_kernel('auto') == 'xla'
  with pytest.raises(RuntimeError, match='no compiler here'):
    packing.resolve_kernel('ffi')
  x = jax.random.normal(KEY, (1, 4, 16))
  apply, _ = _packed(Transformer(), x, rank=8, tile_size=16)
  fp = Transformer().init(KEY, x)['params']
  ref = Transformer().apply({'params': fp}, x)
  assert _rel(apply('xla', x), ref) < 0.2  # the XLA path runs
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert packing.resolve_kernel('auto') == 'xla'


def test_unknown_kernel_is_refused():
  with pytest.raises(ValueError, match='int4_kernel must be one of'):
    lqer.LqerProvider([], int4_kernel='fast')
