"""Saving and loading quantized param trees with safetensors.

Every leaf is stored as its raw bytes (a uint8 view, so int4, float8 and
bfloat16 survive bit-exactly) under its tree path; the safetensors metadata
records each leaf's dtype and shape plus a caller-supplied `fingerprint`
(model name, rules, ...). Loading needs the abstract tree the params must
fit (from `jax.eval_shape` of the LqerProvider model): structure, shapes,
dtypes and fingerprint are all checked, so a checkpoint from another model or
rule set fails loudly, and one with factors loaded into a plain Qwix PTQ
template (or the reverse) says so. AWQ scales, which an abstract tree cannot
know about, are taken from the checkpoint. Save params unpacked: pack after
loading. Saving writes a temporary file (named ``.lqer-tmp-*.tmp``,
`TMP_PREFIX`, so a later run can tell lqer's leftovers from the user's files)
and renames it, so an interrupted save leaves the previous checkpoint intact.
Both ways, a `WithLqer` weight whose factors or scales hold NaN or inf is
refused, naming its param path.
"""

import dataclasses
import json
import os
import pathlib
import tempfile

from flax import nnx
import jax
import ml_dtypes  # noqa: F401  (registers int4, bfloat16, ... with NumPy)
import numpy as np
from safetensors import numpy as st_numpy
from safetensors import safe_open

from lqer import _qwix
from lqer.core.paths import path_str
from lqer.quant import packing
from lqer.quant.rule import LqerRule
from lqer.quant.weight import WithLqer
from lqer.quant.weight import layout_of

FILENAME = 'params.safetensors'
# The names of save's temporary files: only files named so are lqer's to
# delete (lqer.checkpoints.streaming clears them on resume).
TMP_PREFIX = '.lqer-tmp-'


class CheckpointError(ValueError):
  """The checkpoint is missing, truncated or does not fit."""


def _flat(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): x for p, x in leaves}, treedef


def save(
  directory, params, fingerprint: dict, filename: str = FILENAME
) -> pathlib.Path:
  """Writes params to directory/filename atomically.

  Raises:
    CheckpointError: params are packed, or a `WithLqer` weight's factors or
      scales hold NaN or inf (naming the param).
  """
  directory = pathlib.Path(directory)
  is_packed = lambda x: isinstance(x, packing.PackedInt4)
  packed = [
    jax.tree_util.keystr(p)
    for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_packed)[
      0
    ]
    if is_packed(x)
  ]
  if packed:
    raise CheckpointError(
      f'{packed[0]} (and {len(packed) - 1} more) is packed by'
      ' lqer.pack_params; save the params before packing (packing is a'
      ' load-time layout, redone in seconds by pack_params after load)'
    )
  _check_finite(params, f'refusing to save {directory / filename}')
  directory.mkdir(parents=True, exist_ok=True)
  flat, _ = _flat(params)
  tensors, layout = {}, {}
  for key, value in flat.items():
    array = np.asarray(value)
    layout[key] = [array.dtype.name, list(array.shape)]
    tensors[key] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
  metadata = {
    'fingerprint': json.dumps(fingerprint, sort_keys=True),
    'layout': json.dumps(layout),
  }
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix='.tmp')
  os.close(fd)
  try:
    st_numpy.save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, directory / filename)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return directory / filename


def load(
  directory, abstract_params, fingerprint: dict, filename: str = FILENAME
):
  """Reads params saved by `save` into the structure of abstract_params: a
  param tree (abstract or not; a new tree is returned) or a quantized NNX
  model (updated in place and returned, as `pack_params` does)."""
  path = pathlib.Path(directory) / filename
  if not path.exists():
    raise CheckpointError(f'no checkpoint at {path}')
  try:
    with safe_open(str(path), framework='numpy') as f:
      metadata = f.metadata() or {}
      stored = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types
    raise CheckpointError(f'{path} is unreadable or truncated: {e}') from e
  if 'fingerprint' not in metadata or 'layout' not in metadata:
    raise CheckpointError(
      f'{path} was not written by lqer.checkpoints.tree.save'
    )
  saved = json.loads(metadata['fingerprint'])
  if saved != fingerprint:
    diff = sorted(
      k
      for k in set(saved) | set(fingerprint)
      if saved.get(k) != fingerprint.get(k)
    )
    raise CheckpointError(
      f'{path} was written for a different setup: {", ".join(diff)} differ'
      f' (saved {[saved.get(k) for k in diff]}, now'
      f' {[fingerprint.get(k) for k in diff]})'
    )
  layout = json.loads(metadata['layout'])
  expected, treedef = _flat(_with_stored_shapes(abstract_params, layout, path))
  _check_factors(expected, layout, path)
  if set(expected) != set(layout):
    missing = sorted(set(expected) - set(layout))[:3]
    extra = sorted(set(layout) - set(expected))[:3]
    raise CheckpointError(
      f'{path} does not fit the model: missing {missing}, unexpected {extra}'
    )
  leaves = []
  for key, abstract in expected.items():
    dtype, shape = layout[key]
    if np.dtype(dtype) != np.dtype(abstract.dtype) or tuple(shape) != tuple(
      abstract.shape
    ):
      raise CheckpointError(
        f'{path}: {key} is {dtype}{shape}, the model expects'
        f' {np.dtype(abstract.dtype).name}{list(abstract.shape)}'
      )
    leaves.append(stored[key].view(np.dtype(dtype)).reshape(shape))
  _check_finite(jax.tree_util.tree_unflatten(treedef, leaves), str(path))
  params = jax.tree_util.tree_unflatten(
    treedef, [jax.numpy.asarray(x) for x in leaves]
  )
  if isinstance(abstract_params, nnx.Module):  # in place, as pack_params
    nnx.update(abstract_params, nnx.state(params))
    return abstract_params
  return params


def _check_finite(params, where: str) -> None:
  """Raises CheckpointError naming the first `WithLqer` weight with a
  NaN or inf in its floating-point leaves (factors a, b, their scales, the
  input scale, the base's scales)."""
  is_lqer = lambda x: isinstance(x, WithLqer)
  weights = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lqer)[0]
  for key_path, weight in weights:
    if not is_lqer(weight):
      continue
    for field_path, x in jax.tree_util.tree_flatten_with_path(weight)[0]:
      x = np.asarray(x)
      if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
        continue
      bad = int(np.count_nonzero(~np.isfinite(x.astype(np.float32))))
      if bad:
        raise CheckpointError(
          f'{where}: {path_str(key_path)}'
          f'{jax.tree_util.keystr(field_path)} holds {bad} non-finite'
          f' values (NaN or inf) of {x.size}; the factors must be finite'
          ' (a NaN loss in training, or NaN/inf in the float weights or'
          ' the calibration?)'
        )


def _with_stored_shapes(abstract, layout, path):
  """abstract with what the model's template cannot know taken from the
  file: an AWQ base's input scale (lqer_quantize_params(base='awq')) and the
  factors' shapes of rules with rank 'auto' (their allocated ranks)."""

  def stored(key):
    dtype, shape = layout[key]
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))

  def fill(key_path, leaf):
    key = jax.tree_util.keystr(key_path)
    if isinstance(leaf, WithLqer) and getattr(leaf.rule, 'auto_rank', False):
      leaf = dataclasses.replace(
        leaf,
        **{
          f: stored(f'{key}.{f}')
          for f in ('a', 'b', 'a_scale', 'b_scale')
          if f'{key}.{f}' in layout
        },
      )
    if key + '.input_scale' not in layout:
      return leaf
    scale = stored(key + '.input_scale')
    if isinstance(leaf, WithLqer):
      return dataclasses.replace(leaf, input_scale=scale)
    if isinstance(leaf, _qwix.WithAux) and key + '.a' in layout:
      # base='awq' on a weight without rank: a rank-0 WithLqer keeps s.
      rank0 = lambda k: jax.ShapeDtypeStruct(tuple(layout[k][1]), np.float32)
      return WithLqer.create(
        array=leaf.array,
        how=leaf.how,
        layout=layout_of(leaf),
        rule=LqerRule(weight_qtype=leaf.how.qtype),
        a=rank0(key + '.a'),
        b=rank0(key + '.b'),
        input_scale=scale,
        path=path_str(key_path),
      )
    raise CheckpointError(
      f"{path}: {key} has an AWQ scale but the model's"
      ' weight there is not quantized'
    )

  return jax.tree_util.tree_map_with_path(
    fill, abstract, is_leaf=lambda x: isinstance(x, _qwix.WithAux)
  )


def _check_factors(expected, layout, path):
  """Names a weight whose factors are in only one of checkpoint / model."""
  for key in expected:
    if key.endswith('.array.qvalue'):
      weight = key[: -len('.array.qvalue')]
      in_model, in_file = weight + '.a' in expected, weight + '.a' in layout
      if in_file and not in_model:
        raise CheckpointError(
          f"{path}: {weight} holds LQER factors (a, b) but the model's"
          ' template is a plain Qwix PTQ weight: build the template with'
          ' lqer.LqerProvider(rules) and the rules it was saved with'
        )
      if in_model and not in_file:
        raise CheckpointError(
          f'{path}: {weight} is a plain Qwix PTQ weight (no factors) but'
          ' the model expects LQER factors: these params came from'
          ' qwix.quantize_params or rules without a rank; use the'
          ' matching rules, or quantize with lqer.lqer_quantize_params'
        )
