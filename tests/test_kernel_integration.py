"""LqerProvider's packed int4 weights on lqer's CPU kernel (int4_kernel
'ffi') against the XLA packed path ('xla'), every layout pack_params packs,
and the fallback when the kernel is absent."""

import warnings

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


def _packed(model, x, **rule_kw):
  """(apply(kernel, x), packed params) of `model` under LQER int4 rules."""
  fp = model.init(KEY, x)['params']
  rules = [
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
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gemma_einsums_match_the_xla_path(dtype):
  x = jax.random.normal(KEY, (2, 9, 384)).astype(dtype)
  apply, _ = _packed(GemmaLinenBlock(), x.astype(jnp.float32))
  assert _rel(apply('ffi', x), apply('xla', x)) < 1e-5


@needs_kernel
def test_vmap_over_a_batch_matches_the_xla_path():
  x = jax.random.normal(KEY, (3, 2, 5, 16))
  apply, _ = _packed(Transformer(), x[0], rank=8, tile_size=16)
  ys = {k: jax.vmap(lambda b, k=k: apply(k, b))(x) for k in ('ffi', 'xla')}
  assert _rel(ys['ffi'], ys['xla']) < 1e-5


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
