"""Hugging Face checkpoint directories of Llama-family models, read lazily.

A directory holds ``config.json``, the weights as one ``*.safetensors`` file
or several shards (with or without ``model.safetensors.index.json``) in
float32, float16 or bfloat16, and ``tokenizer.json``. `CheckpointDir` checks
every tensor's name, shape and dtype against the config when it opens (from
the safetensors headers alone), then reads one tensor at a time, through
safetensors' memory-mapped reads, as float32 in the Flax layout of
`models.llama`; given a sharding, each device's slice alone is read.

`config_from_hf` checks config.json field by field (types, ranges and
consistency, naming the file and the field); tensors that do not fit it name
the fields that decided their shape or presence. `CheckpointDir.tokenizer`
refuses a tokenizer with more tokens than the embedding has rows.
`CheckpointDir.fingerprint` identifies the weights' content cheaply
(`shard_fingerprint`) and the tokenizer, and `fingerprint_changes` says what
differs from a saved one.

`TABLE` is the one map between Hugging Face names and Flax param paths;
`write_checkpoint` writes a param tree out through it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re

import flax
import jax
import ml_dtypes  # noqa: F401  (registers int4, bfloat16, ... with NumPy)
import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import save_file
import tokenizers

from models.llama import ROPE_TYPES
from models.llama import LlamaConfig
from models.llama import LlamaForCausalLM

MODEL_TYPES = ('llama', 'qwen2')
DTYPES = {'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16'}
INDEX = 'model.safetensors.index.json'
# Hugging Face name -> (Flax path, whether the Flax array is the transpose);
# "{i}" is the block index. Biases exist with config.attention_bias only,
# lm_head with untied embeddings only.
BLOCK = 'model.layers.{i}.'
TABLE = {
  'model.embed_tokens.weight': (('embed', 'embedding'), False),
  'model.norm.weight': (('norm', 'scale'), False),
  'lm_head.weight': (('lm_head', 'kernel'), True),
  BLOCK + 'input_layernorm.weight': (('attn_norm', 'scale'), False),
  BLOCK + 'post_attention_layernorm.weight': (('mlp_norm', 'scale'), False),
  **{
    BLOCK + f'self_attn.{p}.weight': (('attn', p, 'kernel'), True)
    for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj')
  },
  **{
    BLOCK + f'self_attn.{p}.bias': (('attn', p, 'bias'), False)
    for p in ('q_proj', 'k_proj', 'v_proj')
  },
  **{
    BLOCK + f'mlp.{p}.weight': (('mlp', p, 'kernel'), True)
    for p in ('gate_proj', 'up_proj', 'down_proj')
  },
}
# Buffers some exporters save that the config determines: accepted, unread.
BUFFERS = re.compile(r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq')
# The fields of rope_scaling each supported rope type reads.
ROPE_FIELDS = {
  'default': (),
  'linear': ('factor',),
  'llama3': (
    'factor',
    'low_freq_factor',
    'high_freq_factor',
    'original_max_position_embeddings',
  ),
}
# The config.json fields that set each tensor's shape (by its HF name).
_SHAPE_FIELDS = (
  ('embed_tokens', ('vocab_size', 'hidden_size')),
  ('lm_head', ('vocab_size', 'hidden_size')),
  ('q_proj', ('hidden_size', 'num_attention_heads', 'head_dim')),
  ('k_proj', ('hidden_size', 'num_key_value_heads', 'head_dim')),
  ('v_proj', ('hidden_size', 'num_key_value_heads', 'head_dim')),
  ('o_proj', ('hidden_size', 'num_attention_heads', 'head_dim')),
  ('mlp.', ('hidden_size', 'intermediate_size')),
  ('norm', ('hidden_size',)),
)
# The sampled content hash of a shard (`shard_fingerprint`): the first
# SAMPLE_BYTES of each tensor plus SAMPLES chunks of SAMPLE_BYTES evenly
# spaced over the data; a data section no longer than that is hashed whole.
SAMPLES, SAMPLE_BYTES = 64, 1 << 16


class CheckpointDirError(ValueError):
  """The directory is not a readable checkpoint of a supported model."""


_REQUIRED = object()


def _field(hf, name, kind, where, default=_REQUIRED):
  """hf[name] checked: an int (not a bool) > 0, a finite float > 0, or a
  bool; `default` where the field is absent or null (required if none)."""
  value = hf.get(name)
  if value is None:
    if default is _REQUIRED:
      raise CheckpointDirError(
        f'{where}: field {name!r} is missing; needs '
        + {int: 'an integer > 0', float: 'a number > 0'}.get(
          kind, 'true or false'
        )
      )
    return default
  if kind is bool:
    if not isinstance(value, bool):
      raise CheckpointDirError(
        f'{where}: field {name!r} is {value!r}; needs true or false'
      )
    return value
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int and is_number and float(value).is_integer():
    value = int(value)
  if not (
    is_number
    and isinstance(value, int if kind is int else (int, float))
    and math.isfinite(value)
    and value > 0
  ):
    raise CheckpointDirError(
      f'{where}: field {name!r} is {value!r}; needs'
      f' {"an integer" if kind is int else "a finite number"} > 0'
    )
  return kind(value)


def _rope_scaling(hf, where):
  """config.json's rope_scaling as sorted (key, value) pairs, or None."""
  scaling = hf.get('rope_scaling')
  if scaling is None:
    return None
  if not isinstance(scaling, dict):
    raise CheckpointDirError(
      f'{where}: field "rope_scaling" is {scaling!r}; needs null or an'
      ' object with "rope_type" and its numbers'
    )
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind not in ROPE_TYPES:
    raise CheckpointDirError(
      f'{where}: field "rope_scaling.rope_type" is {kind!r}, which is not'
      f' supported; supported: {", ".join(ROPE_TYPES)}'
    )
  for key in ROPE_FIELDS[kind]:
    _field(scaling, key, float, f'{where} (rope_scaling, {kind})')
  if kind == 'llama3' and not (
    scaling['high_freq_factor'] > scaling['low_freq_factor']
  ):
    raise CheckpointDirError(
      f'{where}: rope_scaling.high_freq_factor'
      f' ({scaling["high_freq_factor"]}) must exceed low_freq_factor'
      f' ({scaling["low_freq_factor"]})'
    )
  return tuple(sorted(scaling.items()))


def config_from_hf(hf: dict, where='config.json') -> LlamaConfig:
  """`LlamaConfig` of a Hugging Face ``config.json`` (Llama, SmolLM2, Qwen2).

  Args:
    hf: the parsed config.json.
    where: the file's name for error messages.

  Raises:
    CheckpointDirError: naming `where` and the field, for a field that is
      missing, of the wrong type or range, or inconsistent with the others
      (heads that do not divide the hidden size or each other, an odd head
      dimension), or a model the Llama decoder does not cover.
  """
  if not isinstance(hf, dict):
    raise CheckpointDirError(
      f'{where} holds a {type(hf).__name__}, not a JSON object of fields'
    )
  kind = hf.get('model_type')
  if kind not in MODEL_TYPES:
    raise CheckpointDirError(
      f'{where}: model_type {kind!r} is not supported; supported:'
      f' {", ".join(MODEL_TYPES)}'
    )
  if hf.get('hidden_act', 'silu') != 'silu' or hf.get('mlp_bias'):
    raise CheckpointDirError(
      f'{where}: only SwiGLU MLPs without bias are supported'
      f' (hidden_act {hf.get("hidden_act")!r},'
      f' mlp_bias {hf.get("mlp_bias")})'
    )
  if hf.get('use_sliding_window'):
    raise CheckpointDirError(
      f'{where}: use_sliding_window is set; sliding-window attention is'
      ' not supported'
    )
  hidden = _field(hf, 'hidden_size', int, where)
  heads = _field(hf, 'num_attention_heads', int, where)
  kv_heads = _field(hf, 'num_key_value_heads', int, where, heads)
  if heads % kv_heads:
    raise CheckpointDirError(
      f'{where}: num_key_value_heads ({kv_heads}) must divide'
      f' num_attention_heads ({heads})'
    )
  head_dim = _field(hf, 'head_dim', int, where, None)
  if head_dim is None and hidden % heads:
    raise CheckpointDirError(
      f'{where}: num_attention_heads ({heads}) must divide hidden_size'
      f' ({hidden}), or give head_dim'
    )
  if (head_dim or hidden // heads) % 2:
    raise CheckpointDirError(
      f'{where}: the head dimension ({head_dim or hidden // heads},'
      f' {"head_dim" if head_dim else "hidden_size / num_attention_heads"})'
      ' must be even for rotary embeddings'
    )
  return LlamaConfig(
    vocab_size=_field(hf, 'vocab_size', int, where),
    hidden_size=hidden,
    num_layers=_field(hf, 'num_hidden_layers', int, where),
    num_heads=heads,
    num_kv_heads=kv_heads,
    intermediate_size=_field(hf, 'intermediate_size', int, where),
    rope_theta=_field(hf, 'rope_theta', float, where, 10000.0),
    rms_eps=_field(hf, 'rms_norm_eps', float, where, 1e-6),
    max_seq_len=_field(hf, 'max_position_embeddings', int, where, 2048),
    tie_embeddings=_field(hf, 'tie_word_embeddings', bool, where, False),
    rope_pairs='halves',
    rope_scaling=_rope_scaling(hf, where),
    attention_bias=_field(hf, 'attention_bias', bool, where, kind == 'qwen2'),
    explicit_head_dim=(
      None if head_dim in (None, hidden // heads) else head_dim
    ),
  )


def read_json(path, what: str):
  """The parsed JSON file at `path`; CheckpointDirError naming the file and
  the line and column where it is malformed."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise CheckpointDirError(
      f'{path} is not valid JSON (line {e.lineno}, column {e.colno}:'
      f' {e.msg}); it should hold {what}'
    ) from e
  except UnicodeDecodeError as e:
    raise CheckpointDirError(
      f'{path} is not UTF-8 text; it should hold {what}'
    ) from e


def config_to_hf(config: LlamaConfig, dtype: str) -> dict:
  """The ``config.json`` of `config` (a Llama; rope_pairs must be 'halves')."""
  if config.rope_pairs != 'halves':
    raise ValueError(
      'Hugging Face checkpoints rotate halves; reorder the'
      ' query and key kernels first (smollm2.export_hf)'
    )
  return {
    'architectures': ['LlamaForCausalLM'],
    'model_type': 'llama',
    'vocab_size': config.vocab_size,
    'hidden_size': config.hidden_size,
    'intermediate_size': config.intermediate_size,
    'num_hidden_layers': config.num_layers,
    'num_attention_heads': config.num_heads,
    'num_key_value_heads': config.num_kv_heads,
    'head_dim': config.head_dim,
    'rope_theta': config.rope_theta,
    'rope_scaling': dict(config.rope_scaling) if config.rope_scaling else None,
    'rms_norm_eps': config.rms_eps,
    'max_position_embeddings': config.max_seq_len,
    'tie_word_embeddings': config.tie_embeddings,
    'attention_bias': config.attention_bias,
    'hidden_act': 'silu',
    'torch_dtype': dtype,
  }


def tensor_names(
  config: LlamaConfig,
) -> dict[str, tuple[tuple[str, ...], bool]]:
  """Every tensor the config's model has: HF name -> (Flax path, transpose)."""
  names = {}
  for name, (path, transpose) in TABLE.items():
    if name.endswith('.bias') and not config.attention_bias:
      continue
    if name.startswith('lm_head') and config.tie_embeddings:
      continue
    if name.startswith(BLOCK):
      for i in range(config.num_layers):
        names[name.format(i=i)] = ((f'layers_{i}', *path), transpose)
    else:
      names[name] = (path, transpose)
  return names


def flax_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax path -> shape of every param, from the module's abstract init."""
  abstract = jax.eval_shape(
    LlamaForCausalLM(config).init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 1), np.int32),
  )['params']
  return {
    k: v.shape for k, v in flax.traverse_util.flatten_dict(abstract).items()
  }


class CheckpointDir:
  """A checked, lazily read Hugging Face checkpoint directory.

  Attributes:
    path, config (`LlamaConfig`), hf_config (the config.json dict), names
    (`tensor_names` of the config), files ({HF name: shard path}), reads
    and read_elements (tensor reads so far, and their elements: one read
    per `read` without a sharding, one per distinct device slice with one).
  """

  def __init__(self, path):
    self.path = pathlib.Path(path)
    config_file = self.path / 'config.json'
    if not config_file.is_file():
      raise CheckpointDirError(
        f'{self.path} has no config.json: not a Hugging'
        ' Face checkpoint directory'
      )
    self.hf_config = read_json(config_file, "the model's configuration")
    self.config = config_from_hf(self.hf_config, str(config_file))
    self.names = tensor_names(self.config)
    self.files = self._index()
    self.reads = self.read_elements = 0
    self._check()

  def _index(self) -> dict[str, pathlib.Path]:
    index = self.path / INDEX
    if index.is_file():
      weight_map = read_json(index, "the tensors' shards").get('weight_map')
      if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()
      ):
        raise CheckpointDirError(
          f'{index}: field "weight_map" is missing or not an object of'
          ' tensor name -> shard file name'
        )
      shards = sorted({self.path / f for f in weight_map.values()})
      stray = sorted(set(self.path.glob('*.safetensors')) - set(shards))
      if stray:
        raise CheckpointDirError(
          f'{stray[0]} is not in {index}: a shard of'
          ' another checkpoint? Move it out'
        )
    else:
      weight_map, shards = None, sorted(self.path.glob('*.safetensors'))
    if not shards:
      raise CheckpointDirError(f'{self.path} has no *.safetensors file')
    files = {}
    for shard in shards:
      if not shard.is_file():
        raise CheckpointDirError(
          f'{shard} is listed in {index.name} but missing'
        )
      for name in _header(shard):
        if name in files:
          raise CheckpointDirError(
            f'{name} is in both {files[name]} and {shard}'
          )
        if weight_map is not None and weight_map.get(name) != shard.name:
          raise CheckpointDirError(
            f'{shard} holds {name}, which {index.name}'
            f' puts in {weight_map.get(name)}'
          )
        files[name] = shard
    return files

  def _check(self):
    """Names, shapes and dtypes of every tensor against the config (a
    mismatch names the config.json fields that set what was expected)."""
    expected = self.names
    unknown = sorted(
      n for n in self.files if n not in expected and not BUFFERS.fullmatch(n)
    )
    if unknown:
      raise CheckpointDirError(
        f'{len(unknown)} tensors of {self.path} are not parameters of a'
        f' {self.hf_config["model_type"]} model with this config.json:'
        f' {unknown[:5]} (in {self.files[unknown[0]].name})'
        + self._fields_hint(unknown)
      )
    missing = sorted(set(expected) - set(self.files))
    if missing:
      raise CheckpointDirError(
        f'{self.path} lacks {len(missing)} tensors of'
        f' its config.json: {missing[:5]}' + self._fields_hint(missing)
      )
    shapes = flax_shapes(self.config)
    for name, (path, transpose) in expected.items():
      with _open(self.files[name]) as f:
        info = f.get_slice(name)
        dtype, shape = info.get_dtype(), tuple(info.get_shape())
      want = shapes[path][::-1] if transpose else shapes[path]
      if dtype not in DTYPES or shape != tuple(want):
        fields = next((f for k, f in _SHAPE_FIELDS if k in name), ())
        values = ', '.join(
          f'{f} {self.hf_config.get(f, getattr(self.config, f, None))}'
          for f in fields
        )
        raise CheckpointDirError(
          f'{self.files[name]}: {name} is {dtype}{list(shape)}, the config'
          f' needs one of {"/".join(DTYPES)} of shape {list(want)}'
          + (
            ''
            if shape == tuple(want)
            else f' ({self.path / "config.json"} fields {values}: the'
            ' config does not fit the weights)'
          )
        )

  def _fields_hint(self, names) -> str:
    """The config.json fields that decide whether tensors `names` exist
    (num_hidden_layers, tie_word_embeddings, attention_bias), where they
    explain a mismatch; '' elsewhere."""
    where = self.path / 'config.json'
    layers = [
      int(m.group(1))
      for m in map(re.compile(r'model\.layers\.(\d+)\.').match, self.files)
      if m
    ]
    hints = []
    held = max(layers) + 1 if layers else 0
    if held != self.config.num_layers and any(
      n.startswith('model.layers.') for n in names
    ):
      hints.append(
        f'field "num_hidden_layers" is {self.config.num_layers}, the'
        f' shards hold {held} layers'
      )
    if any(n.startswith('lm_head') for n in names):
      hints.append(
        f'field "tie_word_embeddings" is'
        f' {str(self.config.tie_embeddings).lower()}'
      )
    if any(n.endswith('_proj.bias') for n in names):
      hints.append(
        f'field "attention_bias" is {str(self.config.attention_bias).lower()}'
      )
    return f' ({where}: {"; ".join(hints)})' if hints else ''

  def read(self, name: str, sharding=None) -> jax.Array:
    """Tensor `name` as a float32 array in Flax layout; with a
    `jax.sharding.Sharding`, each addressable device's slice is read alone
    (`jax.make_array_from_callback`), so a host reads only its shards."""
    transpose = self.names[name][1]
    with _open(self.files[name]) as f:
      if sharding is None:
        x = f.get_tensor(name)
        self.reads, self.read_elements = (
          self.reads + 1,
          self.read_elements + x.size,
        )
        return jax.device_put((x.T if transpose else x).astype(np.float32))
      tensor = f.get_slice(name)
      shape = tuple(tensor.get_shape())[:: -1 if transpose else 1]

      pieces = {}  # devices holding the same slice (replicas) share a read

      def piece(index):
        key = tuple((s.start, s.stop) for s in index)
        if key not in pieces:
          x = tensor[index[::-1]].T if transpose else tensor[index]
          self.reads, self.read_elements = (
            self.reads + 1,
            self.read_elements + x.size,
          )
          pieces[key] = x.astype(np.float32)
        return pieces[key]

      return jax.make_array_from_callback(shape, sharding, piece)

  def params(self, prefix: str, shardings=None) -> dict:
    """The Flax params under top-level key `prefix` ('layers_3', 'embed',
    'norm', 'lm_head'), read one tensor at a time. shardings: a function
    (Flax path) -> Sharding or None."""
    flat = {}
    for name, (path, _) in self.names.items():
      if path[0] == prefix:
        flat[path[1:]] = self.read(name, shardings and shardings(path))
    return flax.traverse_util.unflatten_dict(flat)

  def _read_tokenizer(self) -> tokenizers.Tokenizer:
    path = self.path / 'tokenizer.json'
    if not path.is_file():
      raise CheckpointDirError(f'{self.path} has no tokenizer.json')
    try:
      return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own error types
      raise CheckpointDirError(
        f'{path} is not a readable tokenizers file: {e}'
      ) from e

  def tokenizer(self) -> tokenizers.Tokenizer:
    """The directory's tokenizer.json, checked to fit the embedding.

    Raises:
      CheckpointDirError: there is none, it does not parse, or it has more
        tokens (added ones included) than config.json's vocab_size, the
        embedding's rows (naming both sizes): its ids would index past the
        embedding, before any calibration or evaluation.
    """
    tokenizer = self._read_tokenizer()
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > self.config.vocab_size:
      raise CheckpointDirError(
        f'{self.path / "tokenizer.json"} has {size} tokens, more than the'
        f' {self.config.vocab_size} rows of the embedding'
        f' ({self.path / "config.json"} field "vocab_size"): the tokenizer'
        " does not fit the checkpoint (another model's tokenizer.json?);"
        ' use the one the checkpoint was trained with'
      )
    return tokenizer

  def check_token_ids(self, ids, what: str = 'token ids') -> None:
    """Raises CheckpointDirError, naming the tokenizer's and the model's
    vocabulary sizes, unless every id in `ids` is a row of the embedding
    (0 <= id < config.json's vocab_size)."""
    ids = np.asarray(ids)
    vocab = self.config.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      try:
        size = f'{self._read_tokenizer().get_vocab_size()} tokens'
      except CheckpointDirError:
        size = 'no readable tokenizer.json'
      raise CheckpointDirError(
        f'{what} reach id {ids.max() if ids.max() >= vocab else ids.min()},'
        f' outside the vocabulary of {self.path}: config.json has'
        f' vocab_size {vocab}, the tokenizer ({self.path / "tokenizer.json"})'
        f' {size}. The ids must be in [0, {vocab}): tokenize with the'
        " checkpoint's own tokenizer.json"
      )

  def fingerprint(self) -> dict:
    """What identifies the source: its config.json, per shard
    `shard_fingerprint` (size, header hash, sampled content hash), and the
    sha256 of tokenizer.json (None without one)."""
    tokenizer = self.path / 'tokenizer.json'
    return {
      'config': self.hf_config,
      'shards': {
        p.name: shard_fingerprint(p) for p in sorted(set(self.files.values()))
      },
      'tokenizer_sha256': (
        hashlib.sha256(tokenizer.read_bytes()).hexdigest()
        if tokenizer.is_file()
        else None
      ),
    }


def shard_fingerprint(path) -> dict:
  """A safetensors file's size, the sha256 of its header (every tensor's
  name, dtype, shape and offsets) and a sha256 of sampled content: the first
  `SAMPLE_BYTES` of each tensor and `SAMPLES` evenly spaced chunks of that
  size (about 20 MB read for a 7B model; the whole data when it is
  smaller). Weights replaced or retrained change it; an edit confined to
  bytes between the samples does not."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  content = hashlib.sha256()
  with open(path, 'rb') as f:
    prefix = f.read(8)
    length = int.from_bytes(prefix, 'little') if len(prefix) == 8 else 0
    header = prefix + f.read(length)
    start = 8 + length
    data = max(size - start, 0)

    def sample(offset, n=SAMPLE_BYTES):
      f.seek(start + offset)
      content.update(f.read(min(n, data - offset)))

    if data <= (SAMPLES + 1) * SAMPLE_BYTES:
      sample(0, data)
    else:
      try:
        tensors = json.loads(header[8:])
      except (json.JSONDecodeError, UnicodeDecodeError):
        tensors = {}
      for name, info in sorted(tensors.items()):
        offsets = info.get('data_offsets') if name != '__metadata__' else None
        if offsets and 0 <= offsets[0] < data:
          sample(offsets[0])
      for j in range(SAMPLES):
        sample((data - SAMPLE_BYTES) * j // (SAMPLES - 1))
  return {
    'bytes': size,
    'header_sha256': hashlib.sha256(header).hexdigest(),
    'content_sha256': content.hexdigest(),
  }


def describe_changes(changes: list[str], limit: int = 3) -> str:
  """The first `limit` of `fingerprint_changes`, '; '-joined, and a count
  of the rest."""
  more = len(changes) - limit
  return '; '.join(changes[:limit]) + (f'; and {more} more' if more > 0 else '')


def fingerprint_changes(saved: dict, now: dict) -> list[str]:
  """What differs between two `CheckpointDir.fingerprint`s, one line each
  (empty: the same source). A saved fingerprint of an older lqer (shard
  sizes only, no tokenizer hash) is compared on what it holds."""
  changes = []
  old_config, new_config = saved.get('config', {}), now.get('config', {})
  for key in sorted(set(old_config) | set(new_config)):
    if old_config.get(key) != new_config.get(key):
      changes.append(
        f'config.json field {key!r} was {old_config.get(key)!r}, now'
        f' {new_config.get(key)!r}'
      )
  old, new = saved.get('shards', {}), now.get('shards', {})
  for name in sorted(set(old) | set(new)):
    if name not in new:
      changes.append(f'{name} is gone')
    elif name not in old:
      changes.append(f'{name} is new')
    else:
      was = old[name] if isinstance(old[name], dict) else {'bytes': old[name]}
      differ = [k for k in was if was[k] != new[name].get(k)]
      what = {
        'bytes': f'size {was["bytes"]} -> {new[name]["bytes"]} bytes',
        'header_sha256': 'tensor names, dtypes, shapes or offsets (header)',
        'content_sha256': 'weights (sampled content hash)',
      }
      if differ:
        changes.append(
          f'{name} changed: {", ".join(what.get(k, k) for k in differ)}'
        )
  if 'tokenizer_sha256' in saved and saved['tokenizer_sha256'] != now.get(
    'tokenizer_sha256'
  ):
    changes.append(
      'tokenizer.json '
      + ('is gone' if now.get('tokenizer_sha256') is None else 'changed')
    )
  return changes


def _open(path):
  try:
    return safe_open(str(path), framework='numpy')
  except (SafetensorError, OSError) as e:
    raise CheckpointDirError(
      f'{path} is not a readable safetensors file (truncated or foreign): {e}'
    ) from e


def _header(path) -> list[str]:
  with _open(path) as f:
    return list(f.keys())


def byte_tokenizer() -> tokenizers.Tokenizer:
  """A tokenizer of the 256 byte-level symbols and no merges: text to
  bytes, for synthetic checkpoints (tests, benchmarks/streaming.py)."""
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer = tokenizers.Tokenizer(
    tokenizers.models.BPE({c: i for i, c in enumerate(alphabet)}, [])
  )
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
    add_prefix_space=False
  )
  return tokenizer


def write_checkpoint(
  directory,
  config: LlamaConfig,
  params,
  tokenizer: tokenizers.Tokenizer | None = None,
  dtype: str = 'bfloat16',
  shard_bytes: int = 2 << 30,
):
  """Writes `params` (a `LlamaForCausalLM` tree, or a function Flax path ->
  array to make each tensor on demand) as a Hugging Face directory: shards of
  about `shard_bytes` with an index, config.json and tokenizer.json. Holds
  one shard's tensors at a time."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  get = (
    params
    if callable(params)
    else (lambda path, flat=flax.traverse_util.flatten_dict(params): flat[path])
  )
  weight_map, shard, size = {}, {}, 0

  def flush():
    nonlocal shard, size
    if shard:
      name = f'shard-{len(set(weight_map.values())) + 1:05d}.safetensors'
      save_file(
        shard, str(directory / (name + '.tmp')), metadata={'format': 'pt'}
      )
      os.replace(directory / (name + '.tmp'), directory / name)
      weight_map.update(dict.fromkeys(shard, name))
    shard, size = {}, 0

  for name, (path, transpose) in tensor_names(config).items():
    x = np.asarray(get(path), np.float32)
    x = np.ascontiguousarray((x.T if transpose else x).astype(dtype))
    if size and size + x.nbytes > shard_bytes:
      flush()
    shard[name], size = x, size + x.nbytes
    del x
  flush()
  (directory / INDEX).write_text(
    json.dumps({'weight_map': weight_map}, indent=1)
  )
  (directory / 'config.json').write_text(
    json.dumps(config_to_hf(config, dtype), indent=1)
  )
  if tokenizer is not None:
    tokenizer.save(str(directory / 'tokenizer.json'))
  return directory
