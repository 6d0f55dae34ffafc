"""Files a user cares about, met as a user meets them (issue 29): lqer
quantize writes, replaces and deletes only its own files in a directory it
owns, refuses a foreign --out and the source, fingerprints the weights
(checked on resume and by lqer eval --load); faults mid-pass (a full disk,
kills in every phase) end, after a rerun, as an uninterrupted run; non-finite
factors, a config.json or a tokenizer that does not fit are refused naming
the param, file and field."""

import argparse
import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from lqer.checkpoints import streaming
from lqer.checkpoints import tree as checkpoint
from lqer.cli import main as cli
from lqer.cli import quantize as quantize_cli
from lqer.cli import tasks
from models import hf_checkpoint
from tests.test_streaming import SETTINGS
from tests.test_streaming import _calib_ids
from tests.test_streaming import tiny_config
from tests.test_streaming import write_tiny

ROOT = pathlib.Path(__file__).parents[1]
LQER_NAME = re.compile(
  r'lqer\.json|rest\.safetensors|block_\d{5}\.safetensors|\.lqer-tmp-.*'
)


class Kill(BaseException):
  """An interruption (Ctrl-C, a scheduler's kill) inside the pass."""


def _quantize(src, out, **kw):
  return streaming.quantize_checkpoint(
    src, out, SETTINGS, _calib_ids(), progress=False, **kw
  )


def _snapshot(root, skip=None) -> dict:
  """{relative path: sha256} of every file under root but those in skip."""
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(pathlib.Path(root).rglob('*'))
    if p.is_file() and (skip is None or not p.is_relative_to(skip))
  }


def _assert_same_output(out, ref):
  """out holds ref's files, every tensor bit for bit, the same metadata
  (fingerprint, layout) and the same lqer.json; files not lqer's are
  ignored. (Not the files' bytes: safetensors writes the metadata's keys in
  a hash map's order.)"""
  ours = lambda d: sorted(
    p.name for p in d.iterdir() if LQER_NAME.fullmatch(p.name)
  )
  assert ours(out) == ours(ref)
  assert not list(out.glob(checkpoint.TMP_PREFIX + '*'))
  assert (out / streaming.META).read_text() == (
    ref / streaming.META
  ).read_text()
  for name in ours(ref):
    if not name.endswith('.safetensors'):
      continue
    got, want = load_file(out / name), load_file(ref / name)
    assert got.keys() == want.keys(), name
    for key in want:
      assert got[key].dtype == want[key].dtype, (name, key)
      assert got[key].tobytes() == want[key].tobytes(), (name, key)
    with (
      safe_open(str(out / name), 'numpy') as f,
      safe_open(str(ref / name), 'numpy') as g,
    ):
      assert f.metadata() == g.metadata(), name


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """A 3-block source with the user's own files in it, and the output of
  one uninterrupted run."""
  root = tmp_path_factory.mktemp('world')
  write_tiny(root / 'src', tiny_config(num_layers=3))
  (root / 'src' / 'README.md').write_text('my model card')
  (root / 'src' / 'notes.tmp').write_text('my notes')
  _quantize(root / 'src', root / 'ref')
  return root


# --- 1. The output directory: lqer's, its files only -------------------------


def test_foreign_out_is_refused_and_force_leaves_the_users_files(
  world, tmp_path
):
  out = tmp_path / 'mine'
  out.mkdir()
  (out / 'notes.tmp').write_text('draft, do not delete')
  (out / 'data.csv').write_text('1,2,3')
  before = _snapshot(tmp_path) | _snapshot(world / 'src')
  with pytest.raises(checkpoint.CheckpointError) as e:
    cli.main(['quantize', str(world / 'src'), '--out', str(out)])
  message = str(e.value)
  assert str(out) in message and 'not empty' in message
  assert '--force' in message and 'lqer.json' in message
  assert _snapshot(tmp_path) | _snapshot(world / 'src') == before
  # With the flag lqer's files go beside the user's, as an empty --out's.
  _quantize(world / 'src', out, force=True)
  _assert_same_output(out, world / 'ref')
  after = _snapshot(tmp_path) | _snapshot(world / 'src')
  assert {k: after[k] for k in before} == before
  # Now lqer's: a rerun (no flag needed) resumes and still leaves them.
  assert _quantize(world / 'src', out)[-1]['block'] == 2
  assert (out / 'notes.tmp').read_text() == 'draft, do not delete'
  _assert_same_output(out, world / 'ref')


def test_a_file_under_lqers_name_is_not_replaced_even_with_force(
  world, tmp_path
):
  out = tmp_path / 'mine'
  out.mkdir()
  (out / 'rest.safetensors').write_text('not lqer output')
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r'holds rest\.safetensors but no lqer\.json.*move it away',
  ):
    _quantize(world / 'src', out, force=True)
  assert (out / 'rest.safetensors').read_text() == 'not lqer output'
  assert sorted(p.name for p in out.iterdir()) == ['rest.safetensors']


@pytest.mark.parametrize('where', ['src', 'src/q', '.'])
def test_out_equal_to_inside_or_holding_the_source_is_refused(world, where):
  out = world / where
  before = _snapshot(world / 'src')
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r'--out .* (is the|is inside the|holds the) checkpoint directory',
  ):
    cli.main(['quantize', str(world / 'src'), '--out', str(out)])
  assert _snapshot(world / 'src') == before
  assert not (world / 'src' / 'q').exists()
  assert not (world / streaming.META).exists()


# --- 4. Faults mid-pass, each followed by a rerun ----------------------------


def _disk_full(monkeypatch, block):
  """save's write of block `block` fails part-way: ENOSPC."""
  real = checkpoint.st_numpy.save_file

  def save_file(tensors, path, metadata=None):
    if any(k.startswith(f"['layers_{block}']") for k in tensors):
      pathlib.Path(path).write_bytes(b'\0' * 1000)  # what fitted
      raise OSError(errno.ENOSPC, 'No space left on device', path)
    return real(tensors, path, metadata=metadata)

  monkeypatch.setattr(
    checkpoint, 'st_numpy', argparse.Namespace(save_file=save_file)
  )


def _replace_fails(monkeypatch, name, error):
  real = os.replace

  def replace(src, dst, *a, **k):
    if pathlib.Path(dst).name == name:
      raise error
    return real(src, dst, *a, **k)

  monkeypatch.setattr(checkpoint.os, 'replace', replace)


def _raise_in(monkeypatch, owner, attr, block, error, key=None):
  """owner.attr raises error when called for block `block`."""
  real = getattr(owner, attr)

  def fake(*a, **k):
    if (key or (lambda *a, **k: a[0].name))(*a, **k) == f'layers_{block}':
      raise error
    return real(*a, **k)

  monkeypatch.setattr(owner, attr, fake)


def _kill_script(src, out, calls):
  """A Python program that runs the pass and SIGKILLs itself in the middle
  of its `calls`-th file write, after half the bytes."""
  return textwrap.dedent(
    f"""
    import os, pathlib, signal, sys
    sys.path.insert(0, {str(ROOT)!r})
    from lqer.checkpoints import tree
    from tests import test_checkpoint_safety as t
    real, seen = tree.st_numpy.save_file, []
    def save_file(tensors, path, metadata=None):
      seen.append(path)
      real(tensors, path, metadata=metadata)
      if len(seen) == {calls}:
        data = pathlib.Path(path).read_bytes()
        pathlib.Path(path).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    tree.st_numpy.save_file = save_file
    t._quantize({str(src)!r}, {str(out)!r})
    """
  )


def test_faults_mid_pass_then_reruns_end_as_an_uninterrupted_run(
  world, tmp_path, monkeypatch
):
  """A kill while lqer.json is being put in place; a real SIGKILL half-way
  through writing block 1; a failed read; a full disk writing a block (on
  the background thread) and the last block, and a failed rename; kills in
  calibrate, quantize and forward: after each, the same command resumes,
  and the last rerun's output equals an uninterrupted run's, tensor for
  tensor. The user's files in the source, beside --out and in it are never
  touched."""
  src, out = world / 'src', tmp_path / 'out'
  (tmp_path / 'notes.tmp').write_text('beside --out')
  user = lambda: _snapshot(tmp_path, skip=out) | _snapshot(src)
  before = user()
  notes = False  # whether the user has put notes.tmp into --out yet

  def check(after_fault):
    """Only lqer's names in out (and the user's notes), user files as
    they were; lqer's temporaries only after a SIGKILL."""
    names = sorted(p.name for p in out.iterdir())
    assert all(LQER_NAME.fullmatch(n) or n == 'notes.tmp' for n in names), names
    temporaries = [n for n in names if n.startswith(checkpoint.TMP_PREFIX)]
    assert bool(temporaries) == (after_fault == 'sigkill'), names
    assert user() == before
    if notes:
      assert (out / 'notes.tmp').read_text() == 'the user put this here'

  # A kill between lqer.json's temporary file and its rename: a new --out
  # holding only lqer's temporary is still a new --out.
  with monkeypatch.context() as m:
    _replace_fails(m, streaming.META, Kill())
    with pytest.raises(Kill):
      _quantize(src, out)
  assert [p.name for p in out.iterdir()] == [
    checkpoint.TMP_PREFIX + streaming.META
  ]
  # A real kill, half-way through writing block 1 (the 3rd file: rest,
  # block 0, block 1); it leaves lqer's temporary file behind.
  run = subprocess.run(
    [sys.executable, '-c', _kill_script(src, out, 3)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
  check('sigkill')
  assert not (out / streaming.block_file(1)).exists()
  # The user keeps notes in lqer's directory; a resumed run must not
  # take them for a leftover (the old rule deleted every *.tmp).
  (out / 'notes.tmp').write_text('the user put this here')
  notes = True
  faults = [
    (  # reading block 1's weights (on the I/O thread)
      lambda m: _raise_in(
        m,
        hf_checkpoint.CheckpointDir,
        'params',
        1,
        OSError(errno.EIO, 'Input/output error'),
        key=lambda self, name, *a: name,
      ),
      OSError,
    ),
    (  # calibrating block 1
      lambda m: _raise_in(m, streaming._Block, 'statistics', 1, Kill()),
      Kill,
    ),
    (lambda m: _disk_full(m, 1), OSError),  # block 1's write, I/O thread
    (  # factoring block 2
      lambda m: _raise_in(
        m,
        streaming,
        'lqer_quantize_params',
        2,
        Kill(),
        key=lambda fp, *a, **k: next(iter(fp)),
      ),
      Kill,
    ),
    (lambda m: _disk_full(m, 2), OSError),  # the last block's write
    (  # the rename of the last block: the disk's last bytes
      lambda m: _replace_fails(
        m,
        streaming.block_file(2),
        OSError(errno.ENOSPC, 'No space left on device'),
      ),
      OSError,
    ),
    (  # block 2's forward, its write in flight
      lambda m: _raise_in(m, streaming._Block, 'forward', 2, Kill()),
      Kill,
    ),
  ]
  done = []
  for inject, error in faults:
    with monkeypatch.context() as m:
      inject(m)
      with pytest.raises(error):
        _quantize(src, out)
    check('fault')
    done.append(len(list(out.glob('block_*'))))
  # Each fault where it was meant. (A kill in block 2's forward may cancel
  # its write before the I/O thread starts it: then block 2 is redone.)
  assert done[:-1] == [1, 1, 1, 2, 2, 2] and done[-1] in (2, 3), done
  records = _quantize(src, out)
  quantized = [r.get('quantize_s') is not None for r in records]
  assert quantized == [False, False, done[-1] == 2], quantized
  _assert_same_output(out, world / 'ref')
  check('done')
  assert (out / 'notes.tmp').read_text() == 'the user put this here'


# --- The source fingerprint: resume and lqer eval --load ---------------------


def _edit_weights(src, name='model.layers.1.mlp.up_proj.weight'):
  """Changes one weight of `name` in place: same shard size and header."""
  index = json.loads((src / hf_checkpoint.INDEX).read_text())
  shard = src / index['weight_map'][name]
  with safe_open(str(shard), 'numpy') as f:
    metadata = f.metadata()
  tensors = load_file(shard)
  tensors[name][0, 0] += 1.0
  size = shard.stat().st_size
  save_file(tensors, shard, metadata=metadata)
  assert shard.stat().st_size == size
  return shard.name


def test_resume_with_another_source_of_the_same_shapes_is_refused(tmp_path):
  config = tiny_config(num_layers=2)
  write_tiny(tmp_path / 'a', config, seed=0)
  write_tiny(tmp_path / 'b', config, seed=1)  # same shapes and sizes
  out = tmp_path / 'out'
  with pytest.MonkeyPatch.context() as m:
    _raise_in(m, streaming._Block, 'statistics', 1, Kill())
    with pytest.raises(Kill):
      _quantize(tmp_path / 'a', out)
  assert (out / streaming.block_file(0)).exists()
  before = _snapshot(out)
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r'other source_fingerprint .*is not the one .*lqer\.json records'
    r'.*shard-\d+\.safetensors changed: weights \(sampled content hash\)',
  ):
    _quantize(tmp_path / 'b', out)
  # The same source, one weight edited in place (same sizes, same header).
  shard = _edit_weights(tmp_path / 'a')
  with pytest.raises(
    checkpoint.CheckpointError,
    match=rf'{shard} changed: weights \(sampled content hash\)',
  ):
    _quantize(tmp_path / 'a', out)
  assert _snapshot(out) == before


def _eval_args(out, force=False):
  return argparse.Namespace(
    load=str(out), eval_text=None, eval_tokens=1024, pack=False, force=force
  )


def test_eval_load_refuses_a_changed_source_unless_forced(
  tmp_path, monkeypatch, capsys
):
  write_tiny(tmp_path / 'src', tiny_config(num_layers=2))
  out = tmp_path / 'out'
  _quantize(tmp_path / 'src', out)
  # Unchanged: the check passes (and reaches loading the model).
  real_load = streaming.load_quantized

  class Loaded(Exception):
    pass

  monkeypatch.setattr(
    streaming, 'load_quantized', lambda *a, **k: (_ for _ in ()).throw(Loaded)
  )
  with pytest.raises(Loaded):
    quantize_cli.eval_quantized_dir(_eval_args(out))
  # Changed weights: refused before any model loads, naming the shard.
  shard = _edit_weights(tmp_path / 'src')
  with pytest.raises(
    ValueError,
    match=rf'source .*src changed since lqer quantize wrote .*out: {shard}'
    r' changed: weights .*--force',
  ):
    quantize_cli.eval_quantized_dir(_eval_args(out))
  # Another tokenizer is another source too.
  tokenizer = tmp_path / 'src' / 'tokenizer.json'
  saved = tokenizer.read_bytes()
  tokenizer.write_text(
    json.dumps(json.loads(saved) | {'truncation': None}, indent=2)
  )
  with pytest.raises(ValueError, match='tokenizer.json changed'):
    quantize_cli.eval_quantized_dir(_eval_args(out))
  tokenizer.write_bytes(saved)
  # --force: evaluates, warning loudly, and labels the rows.
  monkeypatch.setattr(streaming, 'load_quantized', real_load)
  rows = quantize_cli.eval_quantized_dir(_eval_args(out, force=True))
  assert 'WARNING' in capsys.readouterr().err
  assert [r.model for r in rows] == ['out (source changed)'] * 2
  assert all(np.isfinite(r.value) for r in rows)
  # The source gone: said so, naming it.
  shutil.rmtree(tmp_path / 'src')
  with pytest.raises(FileNotFoundError, match=r'names the source .*src'):
    quantize_cli.eval_quantized_dir(_eval_args(out))


def test_eval_load_typo_fails_before_any_model_loads(tmp_path, monkeypatch):
  def no_model(*a, **k):
    raise AssertionError('a model was loaded')

  for name in list(tasks.TASKS):
    monkeypatch.setitem(tasks.TASKS, name, no_model)
  with pytest.raises(FileNotFoundError, match=r'--load .*typo: no such'):
    cli.main(['eval', '--load', str(tmp_path / 'typo')])
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'a.txt').write_text('x')
  with pytest.raises(
    FileNotFoundError,
    match=r'--load .*notes holds neither lqer\.json .* nor'
    r' \*/params\.safetensors',
  ):
    cli.main(['eval', '--load', str(tmp_path / 'notes')])


# --- 2. Non-finite factors: tree.save and tree.load --------------------------


@pytest.mark.parametrize('field, value', [('a', np.nan), ('b', -np.inf)])
def test_save_and_load_refuse_non_finite_factors(world, tmp_path, field, value):
  _, params, meta = streaming.load_quantized(world / 'ref')
  block = {'layers_1': params['layers_1']}
  w = block['layers_1']['mlp']['down_proj']['kernel']
  bad = dataclasses.replace(w, **{field: getattr(w, field).at[0, 1].set(value)})
  poisoned = jax.tree.map(lambda x: x, block)
  poisoned['layers_1']['mlp']['down_proj']['kernel'] = bad
  match = rf'layers_1/mlp/down_proj/kernel\.{field} holds 1 non-finite'
  fingerprint = {'run': streaming._fingerprint(meta)}
  with pytest.raises(checkpoint.CheckpointError, match=match):
    checkpoint.save(tmp_path, poisoned, fingerprint, 'x.safetensors')
  assert not list(tmp_path.iterdir())
  # A file whose factors hold one (written by hand, as a damaged or
  # foreign file would be): lqer eval --load's loader refuses it.
  out = tmp_path / 'out'
  shutil.copytree(world / 'ref', out)
  path = out / streaming.block_file(1)
  with safe_open(str(path), 'numpy') as f:
    metadata = f.metadata()
  tensors = load_file(path)
  key = f"['layers_1']['mlp']['down_proj']['kernel'].{field}"
  stored = tensors[key].view(np.float32).copy()
  stored[1] = value
  tensors[key] = stored.view(np.uint8)
  save_file(tensors, path, metadata=metadata)
  with pytest.raises(checkpoint.CheckpointError, match=rf'{path}: .*{match}'):
    streaming.load_quantized(out)


# --- 3. config.json and the tokenizer ----------------------------------------


def _edit_config(path, edit):
  config = json.loads((path / 'config.json').read_text())
  edit(config)
  (path / 'config.json').write_text(json.dumps(config))


@pytest.mark.parametrize(
  'edit, message',
  [
    (lambda c: c.pop('hidden_size'), r"field 'hidden_size' is missing"),
    (
      lambda c: c.update(hidden_size='64'),
      r"field 'hidden_size' is '64'; needs an integer > 0",
    ),
    (
      lambda c: c.update(num_hidden_layers=0),
      r"field 'num_hidden_layers' is 0; needs an integer > 0",
    ),
    (
      lambda c: c.update(rms_norm_eps=float('nan')),
      r"field 'rms_norm_eps' is nan; needs a finite number > 0",
    ),
    (
      lambda c: c.update(tie_word_embeddings='no'),
      r"field 'tie_word_embeddings' is 'no'; needs true or false",
    ),
    (
      lambda c: c.update(num_key_value_heads=3),
      r'num_key_value_heads \(3\) must divide num_attention_heads \(4\)',
    ),
    (
      lambda c: c.update(rope_scaling={'rope_type': 'yarn', 'factor': 2}),
      r"field \"rope_scaling.rope_type\" is 'yarn'.*supported: default",
    ),
    (
      lambda c: c['rope_scaling'].pop('factor'),
      r"\(rope_scaling, llama3\): field 'factor' is missing",
    ),
    (  # inconsistent with the weights
      lambda c: c.update(hidden_size=96, head_dim=24),
      r'embed_tokens.weight is F32\[256, 64\].*shape \[256, 96\].*'
      r'config\.json fields vocab_size 256, hidden_size 96',
    ),
    (
      lambda c: c.update(num_hidden_layers=3),
      r'lacks 12 tensors .*config\.json: field "num_hidden_layers" is 3,'
      r' the shards hold 2 layers',
    ),
    (
      lambda c: c.update(tie_word_embeddings=True),
      r'lm_head\.weight.*config\.json: field "tie_word_embeddings" is true',
    ),
    (
      lambda c: c.update(attention_bias=False),
      r'q_proj\.bias.*config\.json: field "attention_bias" is false',
    ),
  ],
)
def test_config_json_errors_name_the_file_and_field(tmp_path, edit, message):
  write_tiny(tmp_path, tiny_config(num_layers=2))
  _edit_config(tmp_path, edit)
  with pytest.raises(hf_checkpoint.CheckpointDirError) as e:
    hf_checkpoint.CheckpointDir(tmp_path)
  assert str(tmp_path / 'config.json') in str(e.value)
  assert re.search(message, str(e.value)), str(e.value)


def test_malformed_json_is_named_with_its_line(tmp_path):
  write_tiny(tmp_path, tiny_config(num_layers=2))
  (tmp_path / 'config.json').write_text('{"model_type": "llama",\n')
  with pytest.raises(
    hf_checkpoint.CheckpointDirError,
    match=r'config\.json is not valid JSON \(line 2',
  ):
    cli.main(['quantize', str(tmp_path), '--out', str(tmp_path / 'q')])
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(
    hf_checkpoint.CheckpointDirError, match=r'config\.json holds a list'
  ):
    hf_checkpoint.CheckpointDir(tmp_path)
  write_tiny(tmp_path, tiny_config(num_layers=2))
  (tmp_path / hf_checkpoint.INDEX).write_text('{"weight_map": 3}')
  with pytest.raises(
    hf_checkpoint.CheckpointDirError,
    match=r'index\.json: field "weight_map" is missing or not an object',
  ):
    hf_checkpoint.CheckpointDir(tmp_path)
  assert not (tmp_path / 'q').exists()


def test_a_tokenizer_bigger_than_the_embedding_is_refused(
  tmp_path, monkeypatch
):
  write_tiny(tmp_path / 'src', tiny_config(num_layers=2))
  tokenizer = hf_checkpoint.byte_tokenizer()
  tokenizer.add_tokens([f'<extra_{i}>' for i in range(44)])  # 300 > 256
  tokenizer.save(str(tmp_path / 'src' / 'tokenizer.json'))

  def no_calibration(*a, **k):
    raise AssertionError('calibration started')

  monkeypatch.setattr(streaming, 'quantize_checkpoint', no_calibration)
  with pytest.raises(
    hf_checkpoint.CheckpointDirError,
    match=r'tokenizer\.json has 300 tokens, more than the 256 rows of the'
    r' embedding \(.*config\.json field "vocab_size"\)',
  ):
    cli.main(['quantize', str(tmp_path / 'src'), '--out', str(tmp_path / 'q')])
  monkeypatch.undo()
  # Token ids from elsewhere that reach past the embedding: refused before
  # any block is read, naming both sizes.
  ids = _calib_ids()
  ids[1, 2] = 300
  with pytest.raises(
    hf_checkpoint.CheckpointDirError,
    match=r'calib_ids reach id 300, outside the vocabulary .*vocab_size'
    r' 256, the tokenizer .* 300 tokens',
  ):
    streaming.quantize_checkpoint(
      tmp_path / 'src', tmp_path / 'q', SETTINGS, ids, progress=False
    )
  assert not (tmp_path / 'q').exists()
