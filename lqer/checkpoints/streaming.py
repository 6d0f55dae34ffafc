"""Quantize a checkpoint bigger than memory, one decoder block at a time.

`quantize_checkpoint` reads a Hugging Face checkpoint directory of a Llama-
family model (`models.hf_checkpoint`) and, for each decoder block in turn:
reads its float weights, runs the calibration activations through it under
`LqerCalibrationProvider` to collect that block's statistics, quantizes and
factors it with `lqer_quantize_params`, writes it to its own safetensors file
(atomically), and feeds the next block with this block's outputs: of the
quantized block (sequential, GPTQ's way) or of the float block. Memory holds
the embeddings, one block's weights and statistics, and the activations.
With `BlockTuning` (`lqer quantize --tune-steps`), each block's factors are
tuned after the closed form, before the write, so that the quantized block's
output matches the float block's on the block's own inputs (`tune_block`).

The output directory: ``lqer.json`` (format, library version, the settings
the rules are built from, the source's config.json, calibration, source
fingerprint), ``rest.safetensors`` (embeddings, final norm, LM head, float)
and ``block_00000.safetensors`` ... . A run that finds the directory
resumes at the first block without a complete file, if its settings,
source and calibration are the same (else it refuses, naming what differs).
`load_quantized` restores the model for inference, packed or not, on one
device or sharded over a mesh.

lqer writes, replaces and deletes only its own files, in a directory its
``lqer.json`` marks as its own: the names above and its temporary files
(``.lqer-tmp-*``, `checkpoint.TMP_PREFIX`; a run deletes those an
interruption left, nothing else). A non-empty directory without
``lqer.json`` is refused unless `force` (then lqer's files go beside the
others, which stay untouched; a file there under one of lqer's names is
still refused). An output directory equal to the source, inside it or
holding it is refused. The source fingerprint (`CheckpointDir.fingerprint`:
config.json, each shard's size, header hash and sampled content hash, and
tokenizer.json's hash) is checked on resume and by `lqer eval --load`
(`source_changes`).

With a `jax.sharding.Mesh` of axes ('data', 'model'), each block's kernels
are read straight into their shards (column-parallel q, k, v, gate, up;
row-parallel o, down) and the activations split over 'data'; with
`jax.distributed.initialize()` each host reads only its own shards.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import resource
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import qwix
from tqdm.auto import tqdm

from lqer._version import __version__
from lqer.checkpoints import tree as checkpoint
from lqer.offline.params import lqer_quantize_params
from lqer.offline.tune import tune_factors
from lqer.providers import calibration
from lqer.providers.calibration import LqerCalibrationProvider
from lqer.providers.inference import LqerProvider
from lqer.quant import recipes
from lqer.quant.packing import pack_params

META = 'lqer.json'
FORMAT = 'lqer-blocks/1'
REST = 'rest.safetensors'
MODULE_PATH = r'layers_\d+/(attn|mlp)/.*'
# Kernels split over 'model' along their output (column-parallel) or input
# (row-parallel) axis.
_ROW_PARALLEL = ('o_proj', 'down_proj')


def block_file(i: int) -> str:
  return f'block_{i:05d}.safetensors'


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the rules are built from (`recipes.build_rules`: per-group
  tile_size where the contracting size allows, per-channel elsewhere), as
  `lqer quantize` takes it; stored in lqer.json so a load rebuilds them."""

  bits: int = 4
  tile_size: int | None = 128
  rank: int | None = 32
  method: str = 'qera'
  base: str = 'rtn'
  factor_qtype: str | None = None

  @property
  def calibrated(self) -> bool:
    """Whether quantizing reads activation statistics ('svd' on the RTN
    base does not: its blocks need no calibration pass and no forward)."""
    return self.method != 'svd' or self.base != 'rtn'

  @property
  def second_moment(self) -> bool:
    """Whether E[x^T x] is needed (qera, gptq), not only mean |x|."""
    return self.method == 'qera' or self.base == 'gptq'

  def rules(self, config):
    return recipes.build_rules(
      _float_shapes(config),
      MODULE_PATH,
      self.bits,
      self.tile_size,
      self.rank,
      self.method,
      factor_qtype=self.factor_qtype,
    )[0]


@dataclasses.dataclass(frozen=True)
class BlockTuning:
  """Per-block tuning of the factors (`lqer quantize --tune-steps`).

  Each block's A, B (bases frozen) take `steps` Adam steps of
  `lqer.tune_factors` with output='mse',

      min_{A,B}  Σ ||f_q(x) - f(x)||² / Σ ||f(x)||²,

  f the float block, f_q the quantized one, x the block's inputs (those
  of the quantized blocks before it when sequential) over the first
  `tokens` calibration tokens, one window per step; kept only where the
  objective drops. Recorded in lqer.json (a resume must agree).
  """

  steps: int
  tokens: int
  lr: float = 1e-3
  seed: int = 0

  def __post_init__(self):
    if not (isinstance(self.steps, int) and self.steps > 0):
      raise ValueError(f'BlockTuning.steps must be an int > 0: {self.steps}')
    if not (isinstance(self.tokens, int) and self.tokens > 0):
      raise ValueError(f'BlockTuning.tokens must be an int > 0: {self.tokens}')
    if not (np.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f'BlockTuning.lr must be a number > 0: {self.lr}')


def tune_block(block, fp, quantized, batches, tuning: BlockTuning):
  """(quantized with tuned factors, `TuneRecord`): `BlockTuning`'s
  objective on the windows of `batches` (a list of (windows, length,
  hidden) inputs) holding the first `tuning.tokens` tokens."""
  windows = [w[None] for x in batches for w in x]
  per_window = windows[0].shape[1]
  windows = windows[: max(1, -(-tuning.tokens // per_window))]
  return tune_factors(
    lambda p, x: block.quantized.apply({'params': p}, x),
    fp,
    quantized,
    [(w,) for w in windows],
    steps=tuning.steps,
    lr=tuning.lr,
    output='mse',
    seed=tuning.seed,
    fp_apply_fn=lambda p, x: block.module.apply({'params': p}, x),
  )


def _float_shapes(config):
  from models.llama import LlamaForCausalLM  # pylint: disable=g-import-not-at-top

  return jax.eval_shape(
    LlamaForCausalLM(config).init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 1), jnp.int32),
  )['params']


def kernel_spec(path) -> P:
  """PartitionSpec of a block param by its Flax path under a mesh with axes
  ('data', 'model'): kernels split over 'model', the rest replicated."""
  if path[-1] != 'kernel':
    return P()
  return P('model', None) if path[-2] in _ROW_PARALLEL else P(None, 'model')


def _check_mesh(mesh):
  if mesh is not None and set(mesh.axis_names) != {'data', 'model'}:
    raise ValueError(
      f'the mesh needs axes ("data", "model"), got {mesh.axis_names}'
    )


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _Block:
  """Decoder block `layer`: its float, calibration and quantized forms."""

  def __init__(self, config, layer, rules, example, second_moment=True):
    from models.llama import SingleBlock  # pylint: disable=g-import-not-at-top

    self.name = f'layers_{layer}'
    module = self.module = SingleBlock(config, layer)
    self.float_apply = jax.jit(module.apply)
    self.calib = qwix.quantize_model(
      module, LqerCalibrationProvider(rules, second_moment=second_moment)
    )
    self.quantized = qwix.quantize_model(module, LqerProvider(rules))
    self.abstract = jax.eval_shape(
      self.quantized.init, jax.random.key(0), example
    )['params']

  def statistics(self, params, batches, outputs):
    """The block's statistics over the batches (and, with `outputs`, the
    float block's outputs)."""
    return calibration.calibrate(
      self.calib, params, [(x,) for x in batches], outputs=outputs
    )

  def forward(self, params, batches, quantized):
    apply = jax.jit(self.quantized.apply) if quantized else self.float_apply
    return [apply({'params': params}, x) for x in batches]


def quantize_checkpoint(
  source,
  out,
  settings: Settings,
  calib_ids,
  *,
  sequential: bool = True,
  mesh=None,
  batch: int = 4,
  progress: bool = True,
  force: bool = False,
  tuning: BlockTuning | None = None,
) -> list[dict]:
  """Quantizes a Hugging Face checkpoint one decoder block at a time.

  Args:
    source: a Hugging Face directory or `models.hf_checkpoint.CheckpointDir`.
    out: the output directory (resumed where a run with the same settings
      and source stopped): new, empty, or one an earlier run wrote (its
      ``lqer.json``); not the source, inside it, nor holding it.
    settings: the `Settings` (bits, group, rank, method, base, factors).
    calib_ids: (windows, window) int token ids.
    sequential: feed each block the outputs of the quantized blocks before it
      (True) or of the float ones.
    mesh: a `jax.sharding.Mesh` with axes ('data', 'model'), or None.
    batch: calibration windows per step.
    progress: show a progress bar.
    force: write into a non-empty `out` that has no ``lqer.json`` (`lqer
      quantize --force`): lqer's files are added beside the ones there,
      which it leaves alone (a file there under a name lqer writes is still
      refused). Without it such a directory is refused.
    tuning: a `BlockTuning`: each block's factors tuned to the float
      block's output after the closed form (settings with a rank; the
      blocks then run forward even where the settings need no statistics).

  Returns:
    A record per block: seconds per phase (setup: tracing the block's
    modules; read, calibrate, quantize, write, forward; read and write run on
    a background thread during the previous block's forward, and count the
    time the pass waited for them; a block resumed from its file is not
    calibrated, quantized or written, nor read when sequential; settings that
    are not `calibrated` skip calibrate and forward), their total and the
    process's peak RSS so far; with `tuning`, tune_s and the objective
    before / after (`tune_before`, `tune_after`, `tune_kept`).

  Raises:
    CheckpointError: `out` is not lqer's (see `force`), is or holds the
      source or lies inside it, or holds a run with other settings, source
      (naming what changed) or calibration.
    ValueError: calib_ids are not (windows, window) ids of the model's
      vocabulary (naming the tokenizer's and the model's sizes); tuning
      without a rank.
  """
  from models.hf_checkpoint import CheckpointDir  # pylint: disable=g-import-not-at-top

  _check_mesh(mesh)
  if tuning is not None and not settings.rank:
    raise ValueError(
      f'tuning tunes the factors; settings.rank is {settings.rank!r}'
    )
  ckpt = source if isinstance(source, CheckpointDir) else CheckpointDir(source)
  config, out = ckpt.config, pathlib.Path(out)
  calib_ids = np.asarray(calib_ids)
  if calib_ids.ndim != 2 or not calib_ids.size:
    raise ValueError(
      'calib_ids must be (windows, window) token ids with at least one'
      f' token, got shape {calib_ids.shape}'
    )
  if not np.issubdtype(calib_ids.dtype, np.integer):
    raise TypeError(
      f'calib_ids must be integer token ids, got {calib_ids.dtype}'
    )
  ckpt.check_token_ids(calib_ids, 'calib_ids')
  calib_ids = calib_ids.astype(np.int32)
  _check_paths(out, ckpt.path)
  rules = settings.rules(config)
  meta = _metadata(ckpt, settings, rules, calib_ids, sequential)
  if tuning is not None:
    meta['tuning'] = dataclasses.asdict(tuning)
  fingerprint = _begin(out, meta, force)
  read = lambda name: ckpt.params(
    name, mesh and (lambda path: NamedSharding(mesh, kernel_spec(path)))
  )
  rest = {
    name: read(name)
    for name in ('embed', 'norm', 'lm_head')
    if name != 'lm_head' or not config.tie_embeddings
  }
  if not (out / REST).exists():
    _save(out, rest, fingerprint, REST)
  activations = NamedSharding(mesh, P('data')) if mesh is not None else None
  calibrated = settings.calibrated
  forwards = calibrated or tuning is not None  # the blocks see activations
  batches = [
    jax.device_put(
      jnp.take(rest['embed']['embedding'], calib_ids[i : i + batch], axis=0),
      activations,
    )
    for i in range(0, len(calib_ids), batch)
    if forwards
  ]
  del rest
  example = jax.ShapeDtypeStruct(
    (min(batch, len(calib_ids)), calib_ids.shape[1], config.hidden_size),
    jnp.float32,
  )
  bar = tqdm(
    range(config.num_layers),
    desc='lqer quantize',
    unit='block',
    disable=not progress,
  )
  needs_read = lambda i: (
    i < config.num_layers
    and (not (out / block_file(i)).exists() or (forwards and not sequential))
  )
  # A background thread writes each block's file and reads the next block's
  # float weights once this block's are no longer needed (after its
  # quantize step, so memory holds one float block), while the forward runs.
  # It calls nothing qwix intercepts (jnp.asarray, dot_general, ...): qwix
  # swaps those process-wide while the main thread traces, and a call from
  # another thread can meet a half-removed swap.
  io = concurrent.futures.ThreadPoolExecutor(1, 'lqer-io')
  reading = io.submit(read, 'layers_0') if needs_read(0) else None
  writing, records = None, []
  try:
    for i in bar:
      clock = _Clock()
      block = _Block(config, i, rules, example, settings.second_moment)
      clock('setup', None)
      quantized = _stored_block(out, i, block.abstract, fingerprint)
      if reading is not None:
        fp = {block.name: clock('read', reading.result())}
      if writing is not None:  # done before the read (one thread, in order)
        writing.result()  # raises the write's error
      reading = stats = float_outputs = None
      tune_record = {}
      if quantized is None:
        if calibrated and sequential:
          stats = clock('calibrate', block.statistics(fp, batches, False))
        elif calibrated:
          stats, float_outputs = clock(
            'calibrate', block.statistics(fp, batches, True)
          )
        if jax.process_count() > 1:
          # The offline pass reads the statistics on the host (it keys the
          # shared Cholesky factors by their bytes), which an array
          # spanning processes forbids: they are replicated reductions, one
          # block's, so every process takes them whole.
          stats = jax.tree.map(lambda x: np.asarray(_gather(x)), stats)
        quantized = clock(
          'quantize',
          lqer_quantize_params(
            fp, block.abstract, calibration=stats, base=settings.base
          ),
        )
        del stats
        if tuning is not None:
          quantized, tuned = tune_block(block, fp, quantized, batches, tuning)
          clock('tune', quantized)
          tune_record = {
            'tune_before': tuned.objective_before,
            'tune_after': tuned.objective_after,
            'tune_kept': tuned.kept,
          }
        if jax.process_count() == 1:
          writing = io.submit(_save, out, quantized, fingerprint, block_file(i))
          clock('write', None)
        else:  # process_allgather is collective: every process, in order
          clock('write', _save(out, quantized, fingerprint, block_file(i)))
      if forwards and not sequential:  # the float block's outputs
        batches = float_outputs or clock(
          'forward', block.forward(fp, batches, False)
        )
      fp = None
      if needs_read(i + 1):
        reading = io.submit(read, f'layers_{i + 1}')
      if forwards and sequential:
        if mesh is not None:  # one layout, quantized now or resumed from file,
          quantized = shard_params(quantized, mesh)  # so one forward's bits
        batches = clock('forward', block.forward(quantized, batches, True))
      records.append(
        {
          'block': i,
          **clock.seconds,
          'seconds': clock.total,
          'peak_rss_gb': peak_rss_gb(),
          **tune_record,
        }
      )
      bar.set_postfix_str(
        f'{clock.total:.1f} s/block, peak RSS {peak_rss_gb():.2f} GB'
      )
    if writing is not None:
      writing.result()
  finally:
    io.shutdown(cancel_futures=True)
  return records


class _Clock:
  """Seconds per phase: clock(name, result) blocks on result and charges
  the time since the previous call to name."""

  def __init__(self):
    self.seconds, self.total = {}, 0.0
    self._last = time.perf_counter()

  def __call__(self, name, result):
    jax.block_until_ready(result)
    now = time.perf_counter()
    self.seconds[f'{name}_s'] = now - self._last
    self.total += now - self._last
    self._last = now
    return result


def _metadata(ckpt, settings, rules, calib_ids, sequential) -> dict:
  return {
    'format': FORMAT,
    'lqer_version': __version__,
    'settings': dataclasses.asdict(settings),
    'rules': repr(rules),
    'sequential': sequential,
    'config': ckpt.hf_config,
    'source': str(ckpt.path.resolve()),
    'source_fingerprint': ckpt.fingerprint(),
    'calibration': {
      'windows': list(calib_ids.shape),
      'sha256': hashlib.sha256(calib_ids.tobytes()).hexdigest(),
    },
  }


def _fingerprint(meta) -> dict:
  """What a resumed run (or a load) must agree on: everything in lqer.json
  but the library version and the source's location."""
  return {k: v for k, v in meta.items() if k not in ('lqer_version', 'source')}


def _owned(name: str) -> bool:
  """Whether `name` is one lqer writes in an output directory."""
  return bool(
    name in (META, REST)
    or re.fullmatch(r'block_\d{5}\.safetensors', name)
    or name.startswith(checkpoint.TMP_PREFIX)
  )


def _check_paths(out: pathlib.Path, source: pathlib.Path) -> None:
  """Refuses an output directory that is, lies in, or holds the source."""
  o, s = out.resolve(), source.resolve()
  if o == s or o.is_relative_to(s):
    raise checkpoint.CheckpointError(
      f'--out {out} is {"the" if o == s else "inside the"} checkpoint'
      f' directory {source}: lqer would write its files among the'
      " source's (and its blocks would read as stray shards); give an"
      ' --out outside the source'
    )
  if s.is_relative_to(o):
    raise checkpoint.CheckpointError(
      f'--out {out} holds the checkpoint directory {source}: deleting the'
      ' output to start over would delete the source; give an --out that'
      ' does not contain it'
    )


def _check_out(out: pathlib.Path, force: bool) -> None:
  """Refuses a directory without lqer.json that is not empty (unless
  force), or holds a file under one of lqer's names. lqer's temporary
  files (a first run killed before its lqer.json was in place) do not
  count: `_begin` deletes them."""
  if out.exists() and not out.is_dir():
    raise checkpoint.CheckpointError(
      f'--out {out} is a file; give a directory (new or empty)'
    )
  entries = sorted(
    p.name
    for p in (out.iterdir() if out.exists() else ())
    if not p.name.startswith(checkpoint.TMP_PREFIX)
  )
  if entries and not force:
    listed = ', '.join(entries[:3]) + (', ...' if len(entries) > 3 else '')
    raise checkpoint.CheckpointError(
      f'--out {out} is not empty ({len(entries)} entries: {listed}) and'
      f' has no {META}: it is not an lqer quantize output. Give a new or'
      ' empty --out, or pass --force (quantize_checkpoint(force=True)) to'
      " write lqer's files beside these, which are left alone"
    )
  ours = [e for e in entries if _owned(e)]
  if ours:
    raise checkpoint.CheckpointError(
      f'--out {out} holds {ours[0]} but no {META}: lqer did not write it'
      ' and will not replace it, even with --force; move it away'
    )


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _begin(out: pathlib.Path, meta: dict, force: bool = False) -> dict:
  """Creates out/lqer.json, or checks that an existing one is this run's
  (and deletes the temporary files an interruption left)."""
  path = out / META
  resume = path.exists()
  if resume:
    saved = read_metadata(out)
    diff = sorted(
      k
      for k in set(_fingerprint(saved)) | set(_fingerprint(meta))
      if saved.get(k) != meta.get(k)
    )
    if diff:
      detail = ''
      if 'source_fingerprint' in diff:
        from models import hf_checkpoint  # pylint: disable=g-import-not-at-top

        changes = hf_checkpoint.fingerprint_changes(
          saved['source_fingerprint'], meta['source_fingerprint']
        ) or ['its fingerprint is in an older format']
        detail = (
          f' (the source {meta["source"]} is not the one {path} records,'
          f' {saved.get("source")} as it was then:'
          f' {hf_checkpoint.describe_changes(changes)})'
        )
      raise checkpoint.CheckpointError(
        f'{out} holds a run with other {", ".join(diff)}{detail}; give'
        f' another --out, or delete {out} to start over'
      )
  else:
    _check_out(out, force)
  _barrier('lqer-begin-checked')  # every process checked before one writes
  if jax.process_index() == 0:
    # Saves an interruption cut short: lqer's temporary names only.
    for partial in out.glob(checkpoint.TMP_PREFIX + '*'):
      if partial.is_file() and not partial.is_symlink():
        partial.unlink()
    if not resume:
      out.mkdir(parents=True, exist_ok=True)
      tmp = out / (checkpoint.TMP_PREFIX + META)
      tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
      os.replace(tmp, path)
  _barrier('lqer-begin-written')
  return _fingerprint(meta)


def source_changes(meta: dict, ckpt) -> list[str]:
  """What differs between the source an output directory's ``lqer.json``
  (`meta`) records and `ckpt` (a `CheckpointDir`) now, one line each;
  empty if it is the same."""
  from models.hf_checkpoint import fingerprint_changes  # pylint: disable=g-import-not-at-top

  return fingerprint_changes(meta['source_fingerprint'], ckpt.fingerprint())


def read_metadata(out) -> dict:
  path = pathlib.Path(out) / META
  if not path.is_file():
    raise checkpoint.CheckpointError(
      f'{out} has no {META}: not written by lqer quantize'
    )
  try:
    meta = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise checkpoint.CheckpointError(
      f'{path} is not valid JSON ({e}): damaged; delete {out} and rerun'
      ' lqer quantize'
    ) from e
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise checkpoint.CheckpointError(
      f'{path} is format'
      f' {meta.get("format") if isinstance(meta, dict) else meta!r},'
      f' this lqer reads {FORMAT}'
    )
  return meta


def _gather(x):
  """x on this host whole: a global array spanning processes is gathered
  (collective: every process calls it, in the same order)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return multihost_utils.process_allgather(x, tiled=True)
  return x


def _save(out, params, fingerprint, filename):
  """checkpoint.save of (possibly sharded) params, by process 0."""
  if jax.process_count() > 1:
    params = jax.tree.map(_gather, params)
  if jax.process_index() == 0:
    checkpoint.save(out, params, {'run': fingerprint}, filename)


def _stored_block(out, i, abstract, fingerprint):
  """Block i's params if a complete file of this run holds them, else None
  (an interrupted write leaves no file: saves are atomic)."""
  if not (out / block_file(i)).exists():
    return None
  return checkpoint.load(out, abstract, {'run': fingerprint}, block_file(i))


def load_quantized(out, *, pack: bool = False, mesh=None):
  """Loads a directory written by `quantize_checkpoint`.

  Args:
    out: the directory.
    pack: pack int4 weights for the fast path (`lqer.pack_params`).
    mesh: a `jax.sharding.Mesh` with axes ('data', 'model') to shard the
      params over, as `quantize_checkpoint` shards them.

  Returns:
    (model, params, metadata): the LqerProvider-wrapped `LlamaForCausalLM`,
    its params, and the directory's `lqer.json`.
  """
  from models.hf_checkpoint import config_from_hf  # pylint: disable=g-import-not-at-top
  from models.llama import LlamaForCausalLM  # pylint: disable=g-import-not-at-top

  _check_mesh(mesh)
  out = pathlib.Path(out)
  meta = read_metadata(out)
  config = config_from_hf(meta['config'], f'{out / META} (field "config")')
  settings = Settings(**meta['settings'])
  model = qwix.quantize_model(
    LlamaForCausalLM(config), LqerProvider(settings.rules(config))
  )
  abstract = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )['params']
  fingerprint = {'run': _fingerprint(meta)}
  rest = {k: v for k, v in abstract.items() if not k.startswith('layers_')}
  params = checkpoint.load(out, rest, fingerprint, REST)
  for i in range(config.num_layers):
    name = f'layers_{i}'
    if not (out / block_file(i)).exists():
      raise checkpoint.CheckpointError(
        f'{out / block_file(i)} is missing: the run stopped before block'
        f' {i}; rerun lqer quantize with the same arguments to finish it'
      )
    params |= checkpoint.load(
      out, {name: abstract[name]}, fingerprint, block_file(i)
    )
  if mesh is not None:
    params = shard_params(params, mesh)
  return model, pack_params(params) if pack else params, meta


def shard_params(params, mesh):
  """Places quantized params on `mesh`: each 2-D array of a kernel (values,
  scales, factors) split over 'model' along the kernel's split axis
  (`kernel_spec`) where that axis divides and is not a factor's rank axis;
  everything else replicated."""
  size = mesh.shape['model']

  def place(path, x):
    keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    spec = P()
    if 'kernel' in keys and x.ndim == 2:
      kernel = keys.index('kernel')
      axis = 0 if keys[kernel - 1] in _ROW_PARALLEL else 1
      rank_axis = {'a': 1, 'b': 0}.get(keys[-1])
      if axis != rank_axis and x.shape[axis] % size == 0:
        spec = P(*['model' if a == axis else None for a in range(2)])
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(place, params)
