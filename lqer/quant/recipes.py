"""Rule recipes: the `LqerRule`s of a bits / group / rank / method setting.

`lqer eval`, `lqer finetune` and `lqer quantize` (the streamed pass) build
their rules here, so the three quantize a model the same way.
"""

import re

import flax
import jax.numpy as jnp

from lqer.core.paths import path_str
from lqer.quant.rule import LqerRule

# svdquant-qera's QERA part of the rank, per activation bits: at 8 bits the
# weight's error dominates and half the rank on it scored best (same search).
DEFAULT_ERROR_RANK_SHARE = {4: 0.25, 8: 0.5}


def int_qtype(bits):
  """Qwix's int qtype of `bits` (None: None)."""
  if bits is None:
    return None
  return jnp.int8 if bits == 8 else jnp.int4 if bits == 4 else f'int{bits}'


def method_rule_kw(method: str, rank, error_rank=None, act_bits=4) -> dict:
  """LqerRule fields of an `lqer eval` method at a rank: 'smoothquant' is
  'svdquant' at rank 0; 'svdquant-qera' splits the rank into an SVD part
  and a QERA part of `error_rank` (default: `DEFAULT_ERROR_RANK_SHARE`)."""
  if method == 'smoothquant':
    return dict(method='svdquant', rank=0)
  if method == 'svdquant-qera':
    if error_rank is None:
      error_rank = int(rank * DEFAULT_ERROR_RANK_SHARE[act_bits])
    return dict(
      method='svdquant', rank=rank - error_rank, error_rank=error_rank
    )
  return dict(method=method, rank=rank)


def build_rules(
  fp_params,
  module_path: str,
  bits: int,
  tile_size,
  rank,
  method: str,
  act_bits=None,
  widths=None,
  **rule_kw,
) -> tuple[list[LqerRule], dict]:
  """Rules for bits / tile size / rank, with per-channel fallback.

  A weight whose contracting size (the kernel's first axis) is not a multiple
  of tile_size gets per-channel scales through an earlier, more specific
  rule. act_bits: dynamic activation quantization of the weights' inputs
  (None: weight-only). widths: mixed precision, {module path: bits} of the
  weights quantized to other bits than `bits` (exact-path rules before the
  others, tiled the same way).
  Returns the rules and {'per-group': [...], 'per-channel': [...]}.
  """
  handled = {'per-group': [], 'per-channel': []}
  for path, w in flax.traverse_util.flatten_dict(fp_params).items():
    name = path_str(path[:-1])
    if path[-1] != 'kernel' or not re.fullmatch(module_path, name):
      continue
    fits = tile_size is None or w.shape[0] % tile_size == 0
    handled['per-group' if fits and tile_size else 'per-channel'].append(name)
  common = dict(
    act_qtype=int_qtype(act_bits),
    rank=rank,
    method=method,
    **rule_kw,
  )
  if act_bits is not None:
    # The weights' inputs (both models' Dense layers run dot_general); the
    # attention's activation x activation einsums stay float.
    common['op_names'] = ('dot_general',)
  exact = lambda names: '(' + '|'.join(re.escape(n) for n in names) + ')'
  rules = []
  widths = {n: b for n, b in (widths or {}).items() if b != bits}
  unknown = sorted(set(widths) - {n for v in handled.values() for n in v})
  if unknown:
    raise ValueError(
      f'build_rules: widths name {unknown[0]!r}, which is not a kernel'
      f' matching {module_path!r}'
    )
  for width in sorted(set(widths.values())):
    for kind, tile in (('per-channel', None), ('per-group', tile_size)):
      names = [n for n in handled[kind] if widths.get(n) == width]
      if names:
        rules.append(
          LqerRule(
            module_path=exact(names),
            weight_qtype=int_qtype(width),
            tile_size=tile,
            **common,
          )
        )
  qtype = int_qtype(bits)
  fallback = [n for n in handled['per-channel'] if n not in widths]
  if tile_size and fallback:
    rules.append(
      LqerRule(
        module_path=exact(fallback),
        weight_qtype=qtype,
        **common,
      )
    )
  rules.append(
    LqerRule(
      module_path=module_path,
      weight_qtype=qtype,
      tile_size=tile_size,
      **common,
    )
  )
  return rules, handled
