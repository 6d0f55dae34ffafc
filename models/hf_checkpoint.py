"""Hugging Face checkpoint directories of Llama-family models, read lazily.

A directory holds ``config.json``, the weights as one ``*.safetensors`` file
or several shards (with or without ``model.safetensors.index.json``) in
float32, float16 or bfloat16, and ``tokenizer.json``. `CheckpointDir` checks
every tensor's name, shape and dtype against the config when it opens (from
the safetensors headers alone), then reads one tensor at a time, through
safetensors' memory-mapped reads, as float32 in the Flax layout of
`models.llama`; given a sharding, each device's slice alone is read.

`TABLE` is the one map between Hugging Face names and Flax param paths;
`write_checkpoint` writes a param tree out through it.
"""

from __future__ import annotations

import json
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


class CheckpointDirError(ValueError):
  """The directory is not a readable checkpoint of a supported model."""


def config_from_hf(hf: dict) -> LlamaConfig:
  """`LlamaConfig` of a Hugging Face ``config.json`` (Llama, SmolLM2, Qwen2)."""
  kind = hf.get('model_type')
  if kind not in MODEL_TYPES:
    raise CheckpointDirError(
      f'model_type {kind!r} is not supported; supported:'
      f' {", ".join(MODEL_TYPES)}'
    )
  if hf.get('hidden_act', 'silu') != 'silu' or hf.get('mlp_bias'):
    raise CheckpointDirError(
      'only SwiGLU MLPs without bias are supported'
      f' (hidden_act {hf.get("hidden_act")!r},'
      f' mlp_bias {hf.get("mlp_bias")})'
    )
  if hf.get('use_sliding_window'):
    raise CheckpointDirError('sliding-window attention is not supported')
  heads = hf['num_attention_heads']
  scaling = hf.get('rope_scaling')
  return LlamaConfig(
    vocab_size=hf['vocab_size'],
    hidden_size=hf['hidden_size'],
    num_layers=hf['num_hidden_layers'],
    num_heads=heads,
    num_kv_heads=hf.get('num_key_value_heads') or heads,
    intermediate_size=hf['intermediate_size'],
    rope_theta=float(hf.get('rope_theta', 10000.0)),
    rms_eps=float(hf.get('rms_norm_eps', 1e-6)),
    max_seq_len=hf.get('max_position_embeddings', 2048),
    tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
    rope_pairs='halves',
    rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
    attention_bias=bool(hf.get('attention_bias', kind == 'qwen2')),
    explicit_head_dim=(
      None
      if hf.get('head_dim') in (None, hf['hidden_size'] // heads)
      else hf['head_dim']
    ),
  )


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
    self.hf_config = json.loads(config_file.read_text())
    self.config = config_from_hf(self.hf_config)
    self.names = tensor_names(self.config)
    self.files = self._index()
    self.reads = self.read_elements = 0
    self._check()

  def _index(self) -> dict[str, pathlib.Path]:
    index = self.path / INDEX
    if index.is_file():
      weight_map = json.loads(index.read_text())['weight_map']
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
    """Names, shapes and dtypes of every tensor against the config."""
    expected = self.names
    unknown = sorted(
      n for n in self.files if n not in expected and not BUFFERS.fullmatch(n)
    )
    if unknown:
      raise CheckpointDirError(
        f'{len(unknown)} tensors of {self.path} are not parameters of a'
        f' {self.hf_config["model_type"]} model with this config.json:'
        f' {unknown[:5]} (in {self.files[unknown[0]].name})'
      )
    missing = sorted(set(expected) - set(self.files))
    if missing:
      raise CheckpointDirError(
        f'{self.path} lacks {len(missing)} tensors of'
        f' its config.json: {missing[:5]}'
      )
    shapes = flax_shapes(self.config)
    for name, (path, transpose) in expected.items():
      with _open(self.files[name]) as f:
        info = f.get_slice(name)
        dtype, shape = info.get_dtype(), tuple(info.get_shape())
      want = shapes[path][::-1] if transpose else shapes[path]
      if dtype not in DTYPES or shape != tuple(want):
        raise CheckpointDirError(
          f'{self.files[name]}: {name} is {dtype}{list(shape)}, the config'
          f' needs one of {"/".join(DTYPES)} of shape {list(want)}'
        )

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
        return jax.numpy.asarray((x.T if transpose else x).astype(np.float32))
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

  def tokenizer(self) -> tokenizers.Tokenizer:
    path = self.path / 'tokenizer.json'
    if not path.is_file():
      raise CheckpointDirError(f'{self.path} has no tokenizer.json')
    return tokenizers.Tokenizer.from_file(str(path))

  def fingerprint(self) -> dict:
    """What identifies the source: its config and each shard's name and size."""
    return {
      'config': self.hf_config,
      'shards': {
        p.name: p.stat().st_size for p in sorted(set(self.files.values()))
      },
    }


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
