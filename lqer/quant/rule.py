"""`LqerRule`: a Qwix QuantizationRule plus the reconstruction settings."""

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lqer.core import decompose
from lqer.core import rotation as rotation_lib
from lqer.core.paths import path_str
from lqer.quant import bits
from lqer.quant.bits import qtype_bits
from lqer.quant.bits import qtype_name

FACTOR_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Block-Krylov power iterations per method (benchmarks/offline_pass.py
# and `lqer eval --solver exact` / `--power-iters` measure the trade-off).
DEFAULT_POWER_ITERS = {'svd': 6, 'l2qer': 4, 'qera': 4, 'svdquant': 4}
FACTOR_QTYPES = (None, 'int8', 'int4')
_STRING_QTYPES = ('nf4', 'mxfp4', 'mxfp8', 'nvfp4', *bits.INT_QTYPES)
_CALIBRATIONS = ('absmax', 'minmax', 'rms', 'fixed')


@dataclasses.dataclass(frozen=True, kw_only=True)
class LqerRule(qwix.QuantizationRule):
  """Quantize matching weights as Qwix PTQ would, then add a rank-k A B.

  Every field of `qwix.QuantizationRule` keeps its meaning (`module_path`,
  `weight_qtype`, `tile_size`, `weight_calibration_method`, `act_qtype`, ...).

  Attributes:
    rank: rank k of the reconstruction; None means plain PTQ for this match.
      0 only with 'svdquant' (smoothing alone: SmoothQuant). 'auto': each
      weight's rank is allocated under `lqer_quantize_params(...,
      budget_bits=)` from its spectrum (`lqer.offline.allocation`), up to
      max_rank.
    max_rank: the largest rank 'auto' may give a weight; None = twice the
      uniform rank that would spend the budget (rounded up to 8).
    method: 'svd' (LQER, data-free), 'l2qer' (needs mean |x| per input
      channel) or 'qera' (needs E[x^T x]); see `lqer.core.decompose`. Or
      'svdquant' (needs max |x| and an act_qtype): smooth W by
      `smooth_alpha`, keep the top-k SVD of the smoothed weight in the
      branch, quantize the rest (`decompose.svdquant_split`).
    smooth_alpha: SVDQuant's smoothing migration strength in [0, 1].
    error_rank: 'svdquant' only: a further QERA rank on the residual's
      quantization error (stored in the same A, B: rank + error_rank).
    factor_dtype: dtype of the stored A and B (bfloat16, float16 or float32),
      or of their scales when factor_qtype is set.
    factor_qtype: None (float factors), 'int8' or 'int4': A stored with one
      scale per column, B per row (symmetric absmax); B is refitted to the
      method's objective after A is rounded (`decompose.quantize_factors`).
    refine_iters: LoftQ-style alternations after the first fit: re-quantize
      W - A B with the base, refit A B; a step is kept only where the
      method's objective decreases (`lqer.offline.jobs`).
    solver: 'randomized' (Halko et al., the default) or 'exact' (full SVD).
    oversample: extra sketch columns of the randomized solver.
    power_iters: power iterations of the randomized solver; None (default)
      = `DEFAULT_POWER_ITERS[method]`: 6 for 'svd', whose error matrices
      are near-white (slow convergence), 4 for the activation-aware methods,
      whose weighted matrices have decaying spectra.
    krylov: keep every power iterate in the basis (block Krylov, Musco &
      Musco 2015; default) instead of only the last (subspace iteration).
      Same matmuls; on a 4096 x 4096 int4 error 6 Krylov iterations capture
      more energy (0.992 of exact) than 16 subspace iterations (0.988).
    qera_damping: lambda of the damped Cholesky R + lambda mean(diag R) I.
    seed: seed of the randomized solver's Gaussian sketch, and of the
      rotation's signs.
    rotate: None, or 'hadamard': an orthogonal H on the weight's input,
      folded into the stored weight, y = (x H)(Hᵀ W), H = diag(s)
      (I ⊗ H_b / sqrt(b)) a randomized block Hadamard (`lqer.core.rotation`)
      applied online by a fast Walsh-Hadamard transform. Everything else
      (smoothing, SVDQuant, QERA, the base, activation quantization) then
      works on the rotated input x H and weight Hᵀ W; statistics are
      collected on x H (`LqerCalibrationProvider` rotates under this
      rule). With rank=None it is plain PTQ of the rotated weight.
    rotate_block: the block b of the rotation, a power of two dividing the
      contracting size; None = the largest such power (576 = 9 x 64 -> 64,
      4096 -> 4096).
  """

  rank: int | str | None = None
  method: str = 'svd'
  factor_dtype: jax.typing.DTypeLike = jnp.bfloat16
  factor_qtype: str | None = None
  max_rank: int | None = None
  refine_iters: int = 0
  solver: str = 'randomized'
  oversample: int = 16
  power_iters: int | None = None
  krylov: bool = True
  qera_damping: float = 0.01
  seed: int = 0
  smooth_alpha: float = 0.5
  error_rank: int = 0
  rotate: str | None = None
  rotate_block: int | None = None

  def __post_init__(self):
    _normalize_numbers(self)
    _validate(self)

  @property
  def resolved_power_iters(self) -> int:
    """power_iters, or the method's default when it is None."""
    if self.power_iters is None:
      return DEFAULT_POWER_ITERS[self.method]
    return self.power_iters

  @property
  def needs_calibration(self) -> bool:
    return self.rank is not None and self.method != 'svd'

  @property
  def auto_rank(self) -> bool:
    return self.rank == 'auto'

  @property
  def factor_bits(self) -> int | None:
    """Bits of a quantized factor value, None for float factors."""
    return None if self.factor_qtype is None else qtype_bits(self.factor_qtype)

  @property
  def total_rank(self) -> int | None:
    """Columns of the stored A: rank, plus error_rank for 'svdquant' (0
    for 'auto' until `lqer_quantize_params` allocates)."""
    if self.rank is None:
      return None
    return (0 if self.auto_rank else self.rank) + self.error_rank

  @property
  def stores_lqer(self) -> bool:
    """Whether its weights become `WithLqer`s: a rank, or a rotation
    (rank None: a rank-0 `WithLqer` carrying the rotation)."""
    return self.rank is not None or self.rotate is not None

  def rotation_signs(self, in_size: int, name: str = '') -> np.ndarray | None:
    """The (in_size // b, b) int8 signs of this rule's rotation of an
    in_size-wide input (`lqer.core.rotation.random_signs` of `seed`), None
    without `rotate`. Raises naming `name` if rotate_block does not divide
    in_size."""
    if self.rotate is None:
      return None
    block = self.rotate_block or rotation_lib.default_block(in_size)
    if in_size % block:
      raise ValueError(
        f'{name or "a weight"}: LqerRule(module_path={self.module_path!r})'
        f'.rotate_block {block} does not divide the contracting size'
        f' {in_size}; valid: {rotation_lib.valid_blocks(in_size)} (or None'
        ' for the largest)'
      )
    return rotation_lib.random_signs(self.seed, in_size, block)


# Fields that take numbers: NumPy scalars become Python numbers first.
_INT_FIELDS = (
  'rank',
  'max_rank',
  'refine_iters',
  'oversample',
  'power_iters',
  'seed',
  'error_rank',
  'rotate_block',
  'tile_size',
)
_REAL_FIELDS = ('qera_damping', 'smooth_alpha', 'tile_size')


def _normalize_numbers(rule: LqerRule) -> None:
  """np.int64(8) -> 8, np.float32(0.5) -> 0.5 (the rule is frozen, its
  repr and hash stay those of Python numbers)."""
  for field in set(_INT_FIELDS + _REAL_FIELDS):
    value = getattr(rule, field)
    if isinstance(value, np.integer) and field in _INT_FIELDS:
      object.__setattr__(rule, field, int(value))
    elif isinstance(value, np.floating) and field in _REAL_FIELDS:
      object.__setattr__(rule, field, float(value))


def _fail(rule, field, message):
  raise ValueError(
    f'LqerRule(module_path={rule.module_path!r}).{field}: {message}'
  )


def _validate_qtype(rule, field, qtype):
  if qtype is None:
    return
  if isinstance(qtype, str):
    if qtype not in _STRING_QTYPES:
      try:
        np.dtype(qtype)
      except TypeError:
        _fail(
          rule,
          field,
          f'unknown qtype {qtype!r}; use a jnp dtype such as'
          f' jnp.int4 or jnp.float8_e4m3fn, or one of {_STRING_QTYPES}',
        )
    return
  try:
    np.dtype(qtype)
  except TypeError:
    _fail(rule, field, f'unknown qtype {qtype!r}')


def same_qtype(a, b) -> bool:
  """Whether two Qwix qtypes are the same: 'int4' == jnp.int4."""
  if isinstance(a, str) or isinstance(b, str):
    return qtype_name(a) == qtype_name(b)
  return np.dtype(a) == np.dtype(b)


def _validate_svdquant(rule: LqerRule):
  """smooth_alpha, error_rank and act_qtype for method 'svdquant'."""
  alpha = rule.smooth_alpha
  if (
    isinstance(alpha, bool)
    or not isinstance(alpha, (int, float))
    or not 0 <= alpha <= 1
  ):
    _fail(rule, 'smooth_alpha', f'must be a number in [0, 1], got {alpha!r}')
  if (
    isinstance(rule.error_rank, bool)
    or not isinstance(rule.error_rank, int)
    or rule.error_rank < 0
  ):
    _fail(rule, 'error_rank', f'must be an int >= 0, got {rule.error_rank!r}')
  if rule.error_rank and rule.method != 'svdquant':
    _fail(
      rule,
      'error_rank',
      "applies to method='svdquant' only (other"
      ' methods reconstruct the error with their rank)',
    )
  if rule.method != 'svdquant' or rule.rank is None:
    return
  if rule.act_qtype is None:
    _fail(
      rule,
      'act_qtype',
      "method='svdquant' smooths activations for"
      ' their quantization; set act_qtype (e.g. jnp.int8 or jnp.int4),'
      " or use method='qera' for weight-only quantization",
    )
  if rule.act_static_scale:
    _fail(
      rule,
      'act_static_scale',
      "method='svdquant' quantizes the"
      ' smoothed input x / lam with dynamic scales; Qwix calibrates static'
      ' scales on the unsmoothed input, so set act_static_scale=False',
    )


def _validate_quality_per_bit(rule: LqerRule):
  """factor_qtype, max_rank and refine_iters."""
  if rule.factor_qtype is not None and qtype_name(rule.factor_qtype) not in (
    'int8',
    'int4',
  ):
    _fail(
      rule,
      'factor_qtype',
      f'must be one of {FACTOR_QTYPES}, got {rule.factor_qtype!r}',
    )
  for field, low in (('max_rank', 1), ('refine_iters', 0)):
    value = getattr(rule, field)
    if value is None and field == 'max_rank':
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      _fail(rule, field, f'must be an int >= {low}, got {value!r}')
  if rule.max_rank is not None and not rule.auto_rank:
    _fail(rule, 'max_rank', "bounds rank='auto' only; set rank='auto'")
  if rule.auto_rank and rule.method == 'svdquant':
    _fail(
      rule,
      'rank',
      "'auto' allocates error reconstructions; for"
      " 'svdquant' give the branch's rank (and error_rank) explicitly",
    )
  if rule.refine_iters and rule.method == 'svdquant':
    _fail(
      rule,
      'refine_iters',
      "'svdquant' quantizes its residual once;"
      ' refinement applies to the error methods (svd, l2qer, qera)',
    )
  if rule.refine_iters and rule.auto_rank:
    _fail(
      rule,
      'refine_iters',
      "not with rank='auto': the base would be"
      ' refined for ranks the allocation then cuts; give a fixed rank',
    )


def _validate_rotation(rule: LqerRule):
  """rotate and rotate_block."""
  if rule.rotate is not None and rule.rotate not in rotation_lib.KINDS:
    _fail(
      rule,
      'rotate',
      f'must be None or one of {rotation_lib.KINDS}, got {rule.rotate!r}',
    )
  block = rule.rotate_block
  if block is not None:
    if (
      isinstance(block, bool)
      or not isinstance(block, int)
      or block < 2
      or block & (block - 1)
    ):
      _fail(
        rule,
        'rotate_block',
        f'must be None or a power of two >= 2, got {block!r}',
      )
    if rule.rotate is None:
      _fail(rule, 'rotate_block', "sets the rotation's block; set rotate too")
  if rule.rotate is None:
    return
  if rule.weight_qtype is None:
    _fail(
      rule,
      'rotate',
      'folds the rotation into a quantized weight; set weight_qtype',
    )
  if rule.act_static_scale:
    _fail(
      rule,
      'act_static_scale',
      'a rotated weight quantizes the rotated input x H with dynamic'
      ' scales; Qwix calibrates static scales on the unrotated input, so'
      ' set act_static_scale=False',
    )


def _validate(rule: LqerRule):
  """Raises ValueError naming the field for any invalid setting."""
  try:
    re.compile(rule.module_path)
  except (re.error, TypeError) as e:
    raise ValueError(
      f'LqerRule.module_path: {rule.module_path!r} is not a valid regular'
      f' expression ({e}); it is matched in full against module paths such'
      " as 'layers_0/mlp/up'"
    ) from None
  _validate_qtype(rule, 'weight_qtype', rule.weight_qtype)
  _validate_qtype(rule, 'act_qtype', rule.act_qtype)
  _validate_quality_per_bit(rule)
  if rule.rank is not None and not rule.auto_rank:
    if isinstance(rule.rank, bool) or not isinstance(rule.rank, int):
      _fail(
        rule,
        'rank',
        f"must be a positive int, 'auto' or None, got {rule.rank!r}",
      )
    if rule.rank < (0 if rule.method == 'svdquant' else 1):
      _fail(
        rule,
        'rank',
        f'must be >= 1 (or None for plain PTQ; 0 only with'
        f" method='svdquant'), got {rule.rank}",
      )
  if rule.rank is not None and rule.weight_qtype is None:
    _fail(rule, 'rank', 'a reconstruction needs weight_qtype to be set')
  if rule.method not in decompose.METHODS:
    _fail(
      rule, 'method', f'must be one of {decompose.METHODS}, got {rule.method!r}'
    )
  _validate_svdquant(rule)
  _validate_rotation(rule)
  if rule.solver not in decompose.SOLVERS:
    _fail(
      rule, 'solver', f'must be one of {decompose.SOLVERS}, got {rule.solver!r}'
    )
  if not any(np.dtype(rule.factor_dtype) == np.dtype(d) for d in FACTOR_DTYPES):
    _fail(
      rule,
      'factor_dtype',
      f'must be bfloat16, float16 or float32, got {rule.factor_dtype!r}',
    )
  for field in ('oversample', 'power_iters'):
    value = getattr(rule, field)
    if value is None and field == 'power_iters':
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      _fail(rule, field, f'must be an int >= 0, got {value!r}')
  if not isinstance(rule.krylov, bool):
    _fail(rule, 'krylov', f'must be True or False, got {rule.krylov!r}')
  if (
    isinstance(rule.qera_damping, bool)
    or not isinstance(rule.qera_damping, (int, float))
    or not 0 <= rule.qera_damping < float('inf')
  ):
    _fail(
      rule, 'qera_damping', f'must be a number >= 0, got {rule.qera_damping!r}'
    )
  if isinstance(rule.seed, bool) or not isinstance(rule.seed, int):
    _fail(rule, 'seed', f'must be an int, got {rule.seed!r}')
  if rule.tile_size is not None:
    tiles = (
      rule.tile_size.items()
      if isinstance(rule.tile_size, dict)
      else [(None, rule.tile_size)]
    )
    for axis, ts in tiles:
      if axis is not None and (
        isinstance(axis, bool) or not isinstance(axis, int)
      ):
        _fail(rule, 'tile_size', f'dict keys are axes (ints), got {axis!r}')
      if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts <= 0:
        _fail(
          rule,
          'tile_size',
          'must be a positive int or 1/n, or a dict'
          f' {{axis: that}}, got {rule.tile_size!r}',
        )
      if isinstance(ts, float) and ts > 1:
        _fail(
          rule,
          'tile_size',
          f'a float tile size means 1/count, got {rule.tile_size!r}',
        )
  method, *args = rule.weight_calibration_method.lower().split(',')
  if method not in _CALIBRATIONS:
    _fail(
      rule,
      'weight_calibration_method',
      f'unknown method {method!r}; use one of {_CALIBRATIONS}, e.g.'
      ' "absmax", "minmax" or "absmax,0.9"',
    )
  try:
    values = [float(a) for a in args]
  except ValueError:
    _fail(
      rule,
      'weight_calibration_method',
      f'arguments must be numbers: {rule.weight_calibration_method!r}',
    )
  if method in ('absmax', 'minmax') and values and not 0 < values[0]:
    _fail(
      rule,
      'weight_calibration_method',
      f'clipping factor must be > 0: {rule.weight_calibration_method!r}',
    )
  if (
    method == 'minmax'
    and rule.weight_qtype is not None
    and not any(same_qtype(rule.weight_qtype, q) for q in (jnp.int8, jnp.int4))
  ):
    _fail(
      rule,
      'weight_calibration_method',
      f'Qwix quantizes asymmetrically (minmax) only to int8 and int4, not'
      f' {rule.weight_qtype!r}; use absmax',
    )
  if method == 'rms' and not values:
    _fail(rule, 'weight_calibration_method', 'rms needs a scale, e.g. "rms,3"')


# Ops whose right operand Qwix quantizes as a weight.
WEIGHT_OPS = ('dot_general', 'einsum')


def match_rule(rules: Sequence[qwix.QuantizationRule], path):
  """The rule Qwix applies to the weight at `path`: the first whose
  module_path fully matches the module and whose op_names (if any) take a
  weight op. Raises if that depends on which op read the weight, which a
  param tree does not record."""
  module_path = path_str(path[:-1])
  matches = [
    r
    for r in rules
    if re.fullmatch(r.module_path, module_path)
    and (not r.op_names or set(r.op_names) & set(WEIGHT_OPS))
  ]
  if not matches:
    return None
  first = matches[0]
  if first.op_names and not set(WEIGHT_OPS) <= set(first.op_names):
    # A later rule decides only for the weight ops `first` leaves out.
    left = set(WEIGHT_OPS) - set(first.op_names)
    later = [
      r
      for r in matches[1:]
      if r != first and (not r.op_names or set(r.op_names) & left)
    ]
    if later:
      raise ValueError(
        f'{path_str(path)}: rule {first} applies only to ops'
        f' {first.op_names}, and rule {later[0]} also matches this module;'
        ' which one Qwix used depends on the op, which the param tree does'
        ' not record. Build the abstract tree with LqerProvider(rules)'
        ' instead of passing rules.'
      )
  return first
