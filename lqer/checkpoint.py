"""Saving and loading quantized param trees with safetensors.

Every leaf is stored as its raw bytes (a uint8 view, so int4, float8 and
bfloat16 survive bit-exactly) under its tree path; the safetensors metadata
records each leaf's dtype and shape plus a caller-supplied `fingerprint`
(model name, rules, ...). Loading needs the abstract tree the params must
fit (from `jax.eval_shape` of the LqerProvider model): structure, shapes,
dtypes and fingerprint are all checked, so a checkpoint from another model or
rule set fails loudly. Saving writes a temporary file and renames it, so an
interrupted save leaves the previous checkpoint intact.
"""

import json
import os
import pathlib
import tempfile

import jax
import ml_dtypes  # pylint: disable=unused-import  (registers int4, bf16, ...)
import numpy as np
from safetensors import numpy as st_numpy
from safetensors import safe_open

FILENAME = 'params.safetensors'


class CheckpointError(ValueError):
  """The checkpoint is missing, truncated or does not fit."""


def _flat(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): x for p, x in leaves}, treedef


def save(directory, params, fingerprint: dict) -> pathlib.Path:
  """Writes params to directory/params.safetensors atomically."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  flat, _ = _flat(params)
  tensors, layout = {}, {}
  for key, value in flat.items():
    array = np.asarray(value)
    layout[key] = [array.dtype.name, list(array.shape)]
    tensors[key] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
  metadata = {'fingerprint': json.dumps(fingerprint, sort_keys=True),
              'layout': json.dumps(layout)}
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp')
  os.close(fd)
  try:
    st_numpy.save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, directory / FILENAME)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return directory / FILENAME


def load(directory, abstract_params, fingerprint: dict):
  """Reads params saved by `save` into the structure of abstract_params."""
  path = pathlib.Path(directory) / FILENAME
  if not path.exists():
    raise CheckpointError(f'no checkpoint at {path}')
  try:
    with safe_open(str(path), framework='numpy') as f:
      metadata = f.metadata() or {}
      stored = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types
    raise CheckpointError(f'{path} is unreadable or truncated: {e}') from e
  if 'fingerprint' not in metadata or 'layout' not in metadata:
    raise CheckpointError(f'{path} was not written by lqer.checkpoint.save')
  saved = json.loads(metadata['fingerprint'])
  if saved != fingerprint:
    diff = sorted(k for k in set(saved) | set(fingerprint)
                  if saved.get(k) != fingerprint.get(k))
    raise CheckpointError(
        f'{path} was written for a different setup: {", ".join(diff)} differ'
        f' (saved {[saved.get(k) for k in diff]}, now'
        f' {[fingerprint.get(k) for k in diff]})')
  layout = json.loads(metadata['layout'])
  expected, treedef = _flat(abstract_params)
  if set(expected) != set(layout):
    missing = sorted(set(expected) - set(layout))[:3]
    extra = sorted(set(layout) - set(expected))[:3]
    raise CheckpointError(f'{path} does not fit the model: missing {missing},'
                          f' unexpected {extra}')
  leaves = []
  for key, abstract in expected.items():
    dtype, shape = layout[key]
    if (np.dtype(dtype) != np.dtype(abstract.dtype)
        or tuple(shape) != tuple(abstract.shape)):
      raise CheckpointError(
          f'{path}: {key} is {dtype}{shape}, the model expects'
          f' {np.dtype(abstract.dtype).name}{list(abstract.shape)}')
    leaves.append(stored[key].view(np.dtype(dtype)).reshape(shape))
  return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x)
                                                for x in leaves])
