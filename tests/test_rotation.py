"""Rotations (LqerRule.rotate): the randomized block Hadamard, folded into
the stored weight and applied to the input online."""

import dataclasses
import warnings

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
import scipy.linalg

import lqer
from lqer import LqerProvider
from lqer import LqerRule
from lqer import lqer_quantize_params
from lqer.checkpoints import tree as checkpoint
from lqer.core import rotation
from lqer.offline import params as params_lib
from lqer.quant.weight import rotate_along
from tests import nnx_flow
from tests import reference

KEY = jax.random.key(0)


def _explicit(signs):
  """diag(s) (I ⊗ H_b / sqrt(b)) in float64, from scipy's Hadamard."""
  blocks, b = signs.shape
  hb = scipy.linalg.hadamard(b) / np.sqrt(b)
  return np.diag(signs.reshape(-1).astype(np.float64)) @ np.kron(
    np.eye(blocks), hb
  )


_rotate = jax.jit(rotation.rotate, static_argnums=2)
_rotate_t = jax.jit(rotation.rotate_transpose, static_argnums=2)


@pytest.mark.parametrize('size, block', [(64, None), (128, None), (576, None)])
def test_block_hadamard_is_orthogonal_and_matches_scipy(size, block):
  """H Hᵀ = I to float rounding for blocks 64, 128 and 576 = 9 x 64 (the
  default block: 64); v H, v Hᵀ, along any axis, and Hᵀ R H against the
  explicit matrix."""
  block = block or rotation.default_block(size)
  signs = LqerRule(
    weight_qtype=jnp.int4, rotate='hadamard', rotate_block=block
  ).rotation_signs(size)
  assert signs.shape == (size // block, block) and signs.dtype == np.int8
  assert set(np.unique(signs)) == {-1, 1}
  explicit = _explicit(signs)
  h = np.asarray(_rotate(np.eye(size, dtype=np.float32), signs, -1))
  np.testing.assert_allclose(h, explicit, atol=1e-7)
  np.testing.assert_allclose(h @ h.T, np.eye(size), atol=1e-6)
  x = np.random.default_rng(0).normal(size=(3, 5, size)).astype(np.float32)
  np.testing.assert_allclose(_rotate(x, signs, -1), x @ explicit, atol=2e-6)
  np.testing.assert_allclose(_rotate_t(x, signs, -1), x @ explicit.T, atol=2e-6)
  xt = np.moveaxis(x, -1, 0)
  np.testing.assert_allclose(
    np.moveaxis(np.asarray(_rotate(xt, signs, 0)), 0, -1),
    x @ explicit,
    atol=2e-6,
  )
  if size == 576:
    np.testing.assert_allclose(rotation.matrix(signs), explicit, atol=1e-7)
    r = x.reshape(-1, size).T @ x.reshape(-1, size)
    np.testing.assert_allclose(
      rotation.rotate_gram(r, signs),
      explicit.T @ r @ explicit,
      rtol=1e-5,
      atol=1e-4,
    )


def test_fwht_against_the_matrix_product():
  assert rotation.default_block(576) == 64
  assert rotation.default_block(4096) == 4096
  assert rotation.valid_blocks(576) == [2, 4, 8, 16, 32, 64]
  x = np.random.default_rng(1).normal(size=(4, 256)).astype(np.float32)
  want = x @ scipy.linalg.hadamard(256) / 16
  fwht = jax.jit(rotation.fwht, static_argnums=1)
  np.testing.assert_allclose(fwht(x, -1), want, atol=2e-6)
  np.testing.assert_allclose(fwht(x.T, 0).T, want, atol=2e-6)
  np.testing.assert_allclose(
    jax.jit(rotation.block_hadamard, static_argnums=1)(x, 64),
    x @ np.kron(np.eye(4), scipy.linalg.hadamard(64) / 8),
    atol=2e-6,
  )
  assert fwht(jnp.asarray(x, jnp.bfloat16), -1).dtype == jnp.bfloat16
  np.testing.assert_allclose(
    jax.jit(jax.vmap(rotation.fwht))(x), want, atol=2e-6
  )
  with pytest.raises(ValueError, match='power-of-two'):
    rotation.fwht(x[:, :96])


def test_rule_checks_its_rotation():
  base = dict(module_path='.*', weight_qtype=jnp.int4)
  for bad, match in (
    (dict(rotate='givens'), 'rotate: must be None or one of'),
    (dict(rotate='hadamard', rotate_block=48), 'power of two'),
    (dict(rotate='hadamard', rotate_block=1), 'power of two'),
    (dict(rotate_block=64), 'set rotate too'),
    (
      dict(rotate='hadamard', act_qtype=jnp.int8, act_static_scale=True),
      'act_static_scale',
    ),
  ):
    with pytest.raises(ValueError, match=match):
      LqerRule(**base, **bad)
  with pytest.raises(ValueError, match='set weight_qtype'):
    LqerRule(module_path='.*', rotate='hadamard')
  assert LqerRule(**base, rotate='hadamard', rotate_block=np.int64(64))
  rule = LqerRule(**base, rotate='hadamard', rotate_block=128)
  with pytest.raises(ValueError, match=r'x/kernel.*valid: \[2, 4,'):
    rule.rotation_signs(576, 'x/kernel')
  np.testing.assert_array_equal(
    rule.rotation_signs(256), rule.rotation_signs(256)
  )
  other = dataclasses.replace(rule, seed=1).rotation_signs(256)
  assert not np.array_equal(other, rule.rotation_signs(256))


class _Layouts(nn.Module):
  """Dense, DenseGeneral over two contracting axes, Gemma's einsum."""

  @nn.compact
  def __call__(self, x):  # x (B, T, 128)
    h = nn.relu(nn.DenseGeneral((4, 32), name='up')(x))  # (128, 4, 32)
    down = nn.DenseGeneral(64, axis=(-2, -1), name='down')(h)  # (4, 32, 64)
    heads = nn.Einsum((2, 128, 32), 'BTD,NDH->BTNH', name='heads')(x)
    proj = nn.Dense(64, name='proj')(x)
    return jnp.concatenate(
      [down, heads.reshape(*heads.shape[:2], -1), proj], -1
    )


def _tokens(seed, n=512, d=128):
  return reference.correlated_outlier_activations(
    np.random.default_rng(seed), n, d, n_outliers=4, scale=20.0
  ).reshape(4, n // 4, d)


@pytest.fixture(scope='module')
def layouts():
  model = _Layouts()
  x = jnp.asarray(_tokens(0))
  fp = model.init(KEY, x)['params']
  return model, x, fp, model.apply({'params': fp}, x)


def _rule(**kw):
  base = dict(
    module_path='.*',
    op_names=('dot_general', 'einsum'),
    weight_qtype=jnp.int4,
    tile_size=32,
    factor_dtype=jnp.float32,
  )
  return LqerRule(**(base | kw))


def _calibrate(model, rules, fp, x):
  cal = qwix.quantize_model(model, lqer.LqerCalibrationProvider(rules))
  return lqer.calibrate(cal, fp, [(x,)])


def _quantize(model, rules, fp, x, stats=None, **kw):
  if stats is None and any(r.needs_calibration for r in rules):
    stats = _calibrate(model, rules, fp, x)
  # The XLA packed path: packed and unpacked models then quantize the rotated
  # input in the same program, so they agree to float rounding. (On lqer's
  # CPU kernel the input side compiles differently and per-token int4
  # rounding flips a few values: ~0.6 % apart on these W4A4 outputs.)
  qmodel = qwix.quantize_model(
    model, LqerProvider(rules, compute_dtype=jnp.float32, int4_kernel='xla')
  )
  abstract = jax.eval_shape(qmodel.init, KEY, x)['params']
  params = lqer_quantize_params(fp, abstract, calibration=stats, **kw)
  return qmodel, abstract, params, stats


_JITTED = {}


def _apply(qmodel, params, x):
  """qmodel's jitted apply, one jitted function per model (its compiled
  programs reused)."""
  if id(qmodel) not in _JITTED:
    _JITTED[id(qmodel)] = (qmodel, jax.jit(qmodel.apply))
  return _JITTED[id(qmodel)][1]({'params': params}, x)


def _rel(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def test_rotated_float_model_equals_the_unrotated_one(layouts):
  """Full-rank 'svd' factors in float32 hold all of Hᵀ W - Q, so the
  rotated model is the float one (x H)(Hᵀ W) = x W on every layout; the
  stored kernel is Hᵀ W (reconstructed() undoes H); and x H Hᵀ W = x W."""
  model, x, fp, ref = layouts
  rules = [
    _rule(
      module_path=name,
      rank=r,
      method='svd',
      solver='exact',
      rotate='hadamard',
      rotate_block=block,
    )
    for name, r, block in (
      ('up', 128, 32),
      ('down', 64, None),
      ('heads', 64, None),
      ('proj', 64, 64),
    )
  ]
  qmodel, _, params, _ = _quantize(model, rules, fp, x)
  assert _rel(_apply(qmodel, params, x), ref) < 1e-5
  for name, block in (('up', 32), ('down', 128), ('heads', 128)):
    k = params[name]['kernel']
    assert k.rotation.shape == (128 // block, block)
    w = np.asarray(fp[name]['kernel'])
    np.testing.assert_allclose(k.reconstructed(), w, atol=1e-5)
    # The stored weight approximates Hᵀ W in the kernel's own axes.
    m = np.asarray(k.layout.to_matrix(jnp.asarray(w)), np.float64)
    hw = _explicit(np.asarray(k.rotation)).T @ m
    np.testing.assert_allclose(
      k.layout.to_matrix(k.rotated_kernel(w)), hw, atol=1e-5
    )
  # The einsum directly: x H, contracted with Hᵀ W, is x W.
  k = params['heads']['kernel']
  w = fp['heads']['kernel']
  xh = rotate_along(x, k.rotation, (2,))
  np.testing.assert_allclose(
    jnp.einsum('BTD,NDH->BTNH', xh, k.rotated_kernel(w)),
    jnp.einsum('BTD,NDH->BTNH', x, w),
    rtol=1e-4,
    atol=1e-4,
  )


W4A4 = dict(act_qtype=jnp.int4)
METHODS = {
  'ptq': dict(rank=None),
  'svdquant': dict(rank=8, method='svdquant', smooth_alpha=0.5),
  'qera': dict(rank=8, method='qera'),
}


@pytest.fixture(scope='module')
def w4a4(layouts):
  """{(method, rotated): (qmodel, abstract, params)}: W4A4 (per-token int4
  activations, tile 32), statistics collected once per rotation."""
  model, x, fp, _ = layouts
  out = {}
  for rotate in (None, 'hadamard'):
    stats = None
    for name, method in METHODS.items():
      rules = [_rule(**W4A4, **method, rotate=rotate)]
      if stats is None:
        stats = _calibrate(model, rules, fp, x)
      out[name, rotate is not None] = _quantize(model, rules, fp, x, stats)[:3]
  return out


@pytest.mark.parametrize('method', list(METHODS))
def test_rotated_w4a4_beats_unrotated_on_outlier_channels(
  layouts, w4a4, method
):
  """On tokens with outlier channels (other tokens than calibration's),
  the rotation spreads each outlier over its block before the per-token
  4-bit quantization: PTQ, SVDQuant and QERA all gain."""
  model, _, fp, _ = layouts
  x = jnp.asarray(_tokens(1))
  ref = jax.jit(model.apply)({'params': fp}, x)
  err = {
    rotated: _rel(_apply(qmodel, params, x), ref)
    for rotated in (False, True)
    for qmodel, _, params in [w4a4[method, rotated]]
  }
  assert err[True] < 0.8 * err[False], err
  params = w4a4[method, True][2]
  for name in ('up', 'down', 'heads', 'proj'):
    k = params[name]['kernel']
    assert isinstance(k, lqer.WithLqer) and k.rotation.shape == (1, 128)
    assert k.rank == (0 if method == 'ptq' else 8)


def test_packed_equals_unpacked(layouts, w4a4):
  model, x, _, _ = layouts
  for method in ('ptq', 'svdquant'):
    qmodel, _, params = w4a4[method, True]
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # weights left unpacked are listed
      packed = lqer.pack_params(params)
    for name in ('heads', 'proj'):
      assert isinstance(packed[name]['kernel'].array, lqer.PackedInt4)
      np.testing.assert_array_equal(
        packed[name]['kernel'].rotation, params[name]['kernel'].rotation
      )
    y = _apply(qmodel, params, x)
    assert _rel(_apply(qmodel, packed, x), y) < 1e-5


def test_checkpoint_round_trip_keeps_the_rotation(layouts, w4a4, tmp_path):
  model, x, _, _ = layouts
  qmodel, abstract, params = w4a4['svdquant', True]
  fingerprint = {'model': 'layouts'}
  checkpoint.save(tmp_path, params, fingerprint)
  loaded = checkpoint.load(tmp_path, abstract, fingerprint)
  for name in ('up', 'down', 'heads', 'proj'):
    np.testing.assert_array_equal(
      loaded[name]['kernel'].rotation, params[name]['kernel'].rotation
    )
  np.testing.assert_array_equal(
    _apply(qmodel, loaded, x), _apply(qmodel, params, x)
  )
  # Into an unrotated model's template: refused, not run unrotated.
  with pytest.raises(checkpoint.CheckpointError, match='rotation'):
    checkpoint.load(tmp_path, w4a4['svdquant', False][1], fingerprint)
  checkpoint.save(tmp_path / 'ptq', w4a4['ptq', True][2], fingerprint)
  with pytest.raises(checkpoint.CheckpointError, match='plain Qwix PTQ'):
    checkpoint.load(tmp_path / 'ptq', w4a4['ptq', False][1], fingerprint)


def test_statistics_are_rotated_consistently():
  """Calibration under a rotating rule collects the statistics of x H,
  exactly; unrotated ones are rotated where that is exact (Hᵀ R H, the
  sample), so QERA and GPTQ take either; max |x H| is refused."""
  model = nn.Dense(64, name='proj')
  x = jnp.asarray(_tokens(2))
  fp = model.init(KEY, x)['params']
  rotated = [_rule(**W4A4, rank=8, method='qera', rotate='hadamard')]
  plain = [dataclasses.replace(rotated[0], rotate=None)]
  s_rot = _calibrate(model, rotated, fp, x)['kernel_lqer']
  s_plain = _calibrate(model, plain, fp, x)['kernel_lqer']
  signs = rotated[0].rotation_signs(128)
  np.testing.assert_array_equal(s_rot[params_lib.ROTATION_KEY], signs)
  xh = np.asarray(rotation.rotate(x.reshape(-1, 128), signs))
  np.testing.assert_allclose(s_rot['max_of_abs'], np.abs(xh).max(0), rtol=1e-6)
  derived = params_lib.rotated_stats(s_plain, signs)
  assert 'max_of_abs' not in derived and 'sum_of_abs' not in derived
  for key in ('sum_of_xtx', 'sample'):
    scale = float(np.abs(s_rot[key]).max())
    np.testing.assert_allclose(derived[key], s_rot[key], atol=1e-5 * scale)
  # QERA from unrotated statistics: the same factors to rounding.
  qmodel, _, from_plain, _ = _quantize(
    model, rotated, fp, x, {'kernel_lqer': s_plain}
  )
  _, _, from_rot, _ = _quantize(model, rotated, fp, x, {'kernel_lqer': s_rot})
  assert _rel(_apply(qmodel, from_plain, x), _apply(qmodel, from_rot, x)) < 1e-3
  # Refused: SVDQuant's max |x H| from unrotated statistics; rotated
  # statistics for an unrotated rule; another rotation.
  svdquant = [dataclasses.replace(rotated[0], method='svdquant')]
  with pytest.raises(ValueError, match=r'^kernel: .*unrotated statistics'):
    _quantize(model, svdquant, fp, x, {'kernel_lqer': s_plain})
  with pytest.raises(ValueError, match='rule quantizing this weight does not'):
    _quantize(model, plain, fp, x, {'kernel_lqer': s_rot})
  other = [dataclasses.replace(rotated[0], rotate_block=64)]
  with pytest.raises(ValueError, match='another rotation'):
    _quantize(model, other, fp, x, {'kernel_lqer': s_rot})


class _NnxGemma(nnx.Module):
  """Gemma-style einsum projection and an nnx.Linear."""

  def __init__(self, rngs):
    self.q = nnx.Einsum('BTD,NDH->BTNH', (2, 128, 32), rngs=rngs)
    self.o = nnx.Linear(128, 64, rngs=rngs)

  def __call__(self, x):
    h = self.q(x)
    return jnp.concatenate([h.reshape(*h.shape[:2], -1), self.o(x)], -1)


def test_nnx_rotated_w4a4_jitted():
  x = jnp.asarray(_tokens(3))
  make = lambda: _NnxGemma(nnx.Rngs(0))
  ref = make()(x)
  errors = {}
  for rotate in (None, 'hadamard'):
    rules = [_rule(**W4A4, rotate=rotate)]
    qmodel, _, _ = nnx_flow.quantized(make, rules, x)
    y = nnx.jit(lambda m, x: m(x))(qmodel, x)
    errors[rotate] = _rel(y, ref)
  assert qmodel.q.kernel.rotation.shape == (1, 128)
  assert errors['hadamard'] < 0.8 * errors[None], errors


def test_report_measures_rotated_weights_against_the_float_weight(
  layouts, w4a4
):
  """The report compares a rotated weight in its stored basis: H is
  orthogonal, so its errors are the float basis' (NumPy: ||W - H Ŵ'||)."""
  model, x, fp, _ = layouts
  _, _, params = w4a4['qera', True]
  stats = _calibrate(
    model, [_rule(**W4A4, **METHODS['qera'], rotate='hadamard')], fp, x
  )
  report = lqer.report(fp, params, stats)
  by = {l.path: l for l in report.layers}
  for name in ('up', 'down', 'heads', 'proj'):
    k = params[name]['kernel']
    w = np.asarray(fp[name]['kernel'], np.float64)
    w_hat = np.asarray(k.reconstructed(), np.float64)  # the float basis
    want = np.linalg.norm(w - w_hat) / np.linalg.norm(w)
    assert by[f'{name}/kernel'].weight_error == pytest.approx(want, rel=1e-3)
    assert (
      by[f'{name}/kernel'].output_error < by[f'{name}/kernel'].output_error_base
    )


def test_to_lora_refuses_rotated_weights():
  """Qwix's LoraProvider cannot rotate the input: refused, naming why."""
  model = nn.Dense(64)
  x = jnp.asarray(_tokens(2, 16, 128))
  fp = model.init(KEY, x)['params']
  rules = [_rule(rank=4, rotate='hadamard')]
  _, _, params, _ = _quantize(model, rules, fp, x)
  lrules = lqer.lora_rules([_rule(rank=4)], alpha=4.0)
  lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider(lrules))
  abstract = jax.eval_shape(lora_model.init, KEY, x)['params']
  with pytest.raises(ValueError, match='stored rotated'):
    lqer.to_lora(params, abstract, lrules)


def test_eval_rotate_rows_calibrate_on_the_rotated_input():
  """lqer eval --rotate: the plain PTQ row, then rotated PTQ and methods
  ('+rot'), quantized from statistics collected on x H (the rotated
  rules' calibration), every rotated weight storing its signs."""
  from lqer.cli import eval as eval_cli  # pylint: disable=g-import-not-at-top
  from tests import test_equal_bits  # pylint: disable=g-import-not-at-top

  task = test_equal_bits._task()  # pylint: disable=protected-access
  seen = []
  quantize = eval_cli.tasks.quantize

  def spy(task, rules, stats, *args, **kw):
    model, params, secs = quantize(task, rules, stats, *args, **kw)
    seen.append((rules[-1].rotate, stats, params))
    return model, params, secs

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(eval_cli.tasks, 'quantize', spy)
    rows = list(
      eval_cli.eval_rows(
        task, 4, 16, [4], ['qera', 'svdquant'], act_bits=4, rotate='hadamard'
      )
    )
  assert [r.method for r in rows] == [
    'FP',
    'PTQ',
    'PTQ +rot',
    'QERA +rot',
    'SVDQuant +rot',
  ]
  assert [rotate for rotate, _, _ in seen] == [None, *['hadamard'] * 3]
  assert seen[0][1] is None  # RTN: no statistics for the unrotated row
  for _, stats, params in seen[1:]:
    kernels = [
      w
      for w in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, lqer.WithLqer)
      )
      if isinstance(w, lqer.WithLqer)
    ]
    assert kernels and all(w.rotation is not None for w in kernels)
    markers = [
      s[params_lib.ROTATION_KEY]
      for s in jax.tree.leaves(
        stats, is_leaf=lambda x: isinstance(x, dict) and 'count' in x
      )
      if isinstance(s, dict)
    ]
    assert markers  # collected under the rotating rules
  assert all(np.isfinite(r.value) for r in rows)


@pytest.mark.parametrize(
  'flags,message',
  [
    (['--rotate-block', '64'], 'give --rotate'),
    (['--rotate', '--rotate-block', '48'], 'power of two'),
    (['--rotate', '--budget', '1'], '--rotate with --budget'),
  ],
)
def test_cli_refuses_bad_rotation_flags_before_loading(
  flags, message, monkeypatch
):
  from lqer.cli import main as cli  # pylint: disable=g-import-not-at-top
  from lqer.cli import tasks  # pylint: disable=g-import-not-at-top

  def load(*args, **kwargs):
    raise AssertionError('the model was loaded')

  monkeypatch.setitem(tasks.TASKS, 'smollm2', load)
  with pytest.raises(SystemExit, match=message):
    cli.main(['eval', *flags])
