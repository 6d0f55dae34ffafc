"""`lqer eval` end to end on small slices of the real models (slow)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import qwix

from lqer import LqerProvider
from lqer.checkpoints import tree as checkpoint
from lqer.cli import calib_sweep
from lqer.cli import common
from lqer.cli import eval as eval_cli
from lqer.cli import finetune
from lqer.cli import main as cli
from lqer.cli import tasks
from lqer.quant import recipes


def _by_method(rows):
  return {r.method: r for r in rows}


@pytest.mark.slow
def test_minilm_small_w4a4_svdquant_rows():
  task = tasks.minilm_task(n_calib=32, n_eval=32)
  rows = list(
    eval_cli.eval_rows(
      task,
      4,
      128,
      [16],
      ['svdquant', 'smoothquant'],
      act_bits=4,
      smooth_alpha=0.6,
    )
  )
  by = _by_method(rows)
  assert [r.act_bits for r in rows] == [None] + [4] * 3
  assert by['SmoothQuant'].rank == 0 and by['SVDQuant'].rank == 16
  assert by['SVDQuant'].value < by['SmoothQuant'].value < by['PTQ'].value
  assert '| act bits |' in common.eval_table(rows)


def test_calibration_sweep_table_and_plot(tmp_path):
  """The sweep's table has a column per calibration size and a row per
  configuration; the plot is a PNG."""

  def row(method, calib, value, rank=None):
    return common.Row(
      'minilm',
      method,
      'rtn',
      4,
      128,
      rank,
      '1-cos',
      value,
      None,
      None,
      calib=calib,
    )

  rows = [
    row('FP', 16, 0.0),
    row('PTQ', 16, 0.05),
    row('QERA', 16, 0.02, 8),
    row('PTQ', 32, 0.05),
    row('QERA', 32, 0.01, 8),
  ]
  table = calib_sweep.calib_table(rows).splitlines()
  assert table[0] == '| method | bits | rank | 16 | 32 |'
  assert '| QERA | 4 | 8 | 0.0200 | 0.0100 |' in table
  assert '| PTQ | 4 | - | 0.0500 | 0.0500 |' in table
  png = tmp_path / 'calib.png'
  calib_sweep.plot_calibration(rows, png)
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
@pytest.mark.parametrize(
  'command', [None, 'eval', 'quantize', 'generate', 'finetune']
)
def test_every_help_renders(command, capsys):
  """`lqer [COMMAND] --help` prints and exits 0 (argparse formats each help
  string with %: a bare percent sign in one crashed `lqer eval --help`)."""
  with pytest.raises(SystemExit) as exit_:
    cli.main([command, '--help'] if command else ['--help'])
  assert exit_.value.code == 0
  assert 'usage: lqer' in capsys.readouterr().out


def test_cli_json_and_bad_checkpoint(tmp_path, capsys):
  """`lqer eval --model minilm` end to end on the user's text: JSON rows,
  QERA below PTQ, a checkpoint that loads only under the rules it was
  saved with, and the FP model's embeddings making sense."""
  out = tmp_path / 'rows.json'
  text = tmp_path / 'mine.txt'
  text.write_text(
    'The cat sat on the mat and looked at the door. ' * 40
    + 'Every sentence here is about a cat or a door. ' * 40
  )
  minilm_qera_r4 = ['eval', '--model', 'minilm', '--ranks', '4']
  minilm_qera_r4 += ['--methods', 'qera', '--calib-text', str(text)]
  minilm_qera_r4 += ['--eval-text', str(text)]
  ck = str(tmp_path / 'ck')
  cli.main([*minilm_qera_r4, '--json', str(out), '--save', ck])
  records = json.loads(out.read_text())
  assert [r['method'] for r in records] == ['FP', 'PTQ', 'QERA']
  assert records[2]['value'] < records[1]['value']  # QERA beats PTQ
  assert {
    'model',
    'method',
    'base',
    'bits',
    'tile_size',
    'rank',
    'metric',
    'value',
    'bits_per_weight',
    'offline_seconds',
  } <= set(records[0])
  assert '| QERA |' in capsys.readouterr().out
  # A checkpoint from another rule set (exact solver) must not load silently.
  with pytest.raises(checkpoint.CheckpointError, match='rules'):
    cli.main([*minilm_qera_r4, '--solver', 'exact', '--load', ck])
  # The same rules load and give the same numbers.
  cli.main([*minilm_qera_r4, '--json', str(out), '--load', ck])
  assert json.loads(out.read_text())[2]['value'] == records[2]['value']
  # FP sanity: a paraphrase is closer than an unrelated sentence.
  from models import minilm  # pylint: disable=g-import-not-at-top

  module, params, tokenizer = minilm.load_minilm()
  emb = minilm.encode(
    module,
    params,
    tokenizer,
    [
      'A man is playing a guitar.',
      'Someone plays the guitar.',
      'The stock market fell sharply today.',
    ],
  )
  assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_checkpoint_roundtrip_atomic_and_checked(tmp_path):
  import jax
  import jax.numpy as jnp
  import qwix

  import lqer
  from models import Transformer

  model = Transformer()
  x = jnp.ones((1, 4, 16))
  fp = model.init(jax.random.key(0), x)['params']
  rules = [lqer.LqerRule(weight_qtype=jnp.int4, tile_size=16, rank=4)]
  qmodel = qwix.quantize_model(model, lqer.LqerProvider(rules))
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x)['params']
  params = lqer.lqer_quantize_params(fp, abstract)
  fpr = {'model': 't', 'rules': repr(rules)}
  checkpoint.save(tmp_path, params, fpr)
  loaded = checkpoint.load(tmp_path, abstract, fpr)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert isinstance(loaded['embed']['kernel'], lqer.WithLqer)
  # Another model / rule set / truncated file: clear errors.
  with pytest.raises(checkpoint.CheckpointError, match='model'):
    checkpoint.load(tmp_path, abstract, {**fpr, 'model': 'other'})
  other = jax.eval_shape(
    qwix.quantize_model(
      model,
      lqer.LqerProvider(
        [lqer.LqerRule(weight_qtype=jnp.int4, tile_size=16, rank=2)]
      ),
    ).init,
    jax.random.key(0),
    x,
  )['params']
  with pytest.raises(checkpoint.CheckpointError, match='model expects'):
    checkpoint.load(tmp_path, other, fpr)
  path = tmp_path / checkpoint.FILENAME
  good = path.read_bytes()
  path.write_bytes(good[: len(good) // 2])
  with pytest.raises(checkpoint.CheckpointError, match='truncated'):
    checkpoint.load(tmp_path, abstract, fpr)
  # An interrupted save leaves the previous file intact.
  path.write_bytes(good)

  def boom(*args, **kwargs):
    raise KeyboardInterrupt

  orig = checkpoint.st_numpy.save_file
  checkpoint.st_numpy.save_file = boom
  try:
    with pytest.raises(KeyboardInterrupt):
      checkpoint.save(tmp_path, params, fpr)
  finally:
    checkpoint.st_numpy.save_file = orig
  assert path.read_bytes() == good
  assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]


def _first_layers(task, n):
  """The task on SmolLM2 cut to its first n blocks (a fast stand-in)."""
  from models import smollm2  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(task.module.config, num_layers=n)
  params = {
    k: v
    for k, v in task.params.items()
    if not k.startswith('layers_') or int(k[7:]) < n
  }
  return dataclasses.replace(
    task, module=smollm2.SmolLM2(config), params=params
  )


@pytest.mark.slow
def test_finetune_cli_small(tmp_path, monkeypatch, capsys):
  # 3 blocks: each one costs its calibration, two quantizations and a share
  # of every score.
  task = _first_layers(tasks.smollm2_task(n_calib=1024, n_eval=512), 3)
  monkeypatch.setitem(tasks.TASKS, 'smollm2', lambda *a, **k: task)
  out = tmp_path / 'ft.json'
  # QLoRA from zero (step 0 = the PTQ model) is checked on MiniLM below.
  cli.main(
    [
      'finetune',
      '--steps',
      '1',
      '--init',
      'qera',
      '--json',
      str(out),
      '--save',
      str(tmp_path / 'ck'),
    ]
  )
  records = json.loads(out.read_text())
  table = capsys.readouterr().out
  assert '| QERA | 1 |' in table and 'tokens/s' in table
  assert [(r['init'], r['steps']) for r in records] == [
    ('FP', None),
    ('PTQ', None),
  ] + [('QERA', n) for n in finetune.step_counts(1)]
  by = {(r['init'], r['steps']): r for r in records}
  # Step 0 from QERA (the QERA reconstruction as adapters, before any
  # training) already beats plain PTQ.
  assert by[('QERA', 0)]['perplexity'] < by[('PTQ', None)]['perplexity']
  kernels = [
    w
    for path, w in jax.tree_util.tree_flatten_with_path(task.params)[0]
    if 'layers_' in str(path[0]) and str(path[-1].key) == 'kernel'
  ]
  # a (in, 32) and b (32, out) per quantized kernel.
  assert by[('QERA', 0)]['trainable_params'] == sum(
    32 * sum(w.shape) for w in kernels
  )
  assert by[('QERA', 1)]['train_loss'] > 0
  # The saved QERA-init params load as `lqer eval --load` reads them and
  # score what the tuned LoRA model scored (bf16 factors).
  rules, _ = recipes.build_rules(
    task.params, task.module_path, 4, 128, 32, 'qera'
  )
  model = qwix.quantize_model(task.module, LqerProvider(rules))
  abstract = jax.eval_shape(model.init, jax.random.key(0), *task.example)[
    'params'
  ]
  params = checkpoint.load(
    tasks.subdir(tmp_path / 'ck', 4, 128, 'qera', 32),
    abstract,
    tasks.fingerprint('smollm2', rules, 'rtn'),
  )
  # Mean NLL (log perplexity): 3 of 30 blocks score ~1e7-1e8 in perplexity,
  # which magnifies the bf16 rounding of the saved factors.
  assert np.log(task.score(model, params)['perplexity']) == pytest.approx(
    np.log(by[('QERA', 1)]['perplexity']), rel=5e-3
  )


@pytest.mark.slow
def test_finetune_step_holds_no_float_copy_of_the_base():
  """SmolLM2 at batch 1 x 512: the compiled step's temp memory is at most
  half the float32 weights, less than the float32 copy of the quantized
  layers alone, so the base is never dequantized whole."""
  import optax  # pylint: disable=g-import-not-at-top

  from lqer.lora import adapters as lora  # pylint: disable=g-import-not-at-top
  from lqer.lora import training  # pylint: disable=g-import-not-at-top

  task = tasks.smollm2_task(n_calib=512, n_eval=512)
  rules, _ = recipes.build_rules(
    task.params, task.module_path, 4, 128, 32, 'svd'
  )
  # The step is compiled from shapes: the LQER params' shapes (the
  # provider's init, as lqer_quantize_params would fill them) suffice.
  lqer_model = qwix.quantize_model(task.module, LqerProvider(rules))
  params = jax.eval_shape(lqer_model.init, jax.random.key(0), *task.example)[
    'params'
  ]
  lrules = lora.lora_rules(rules, 32.0)
  lora_model = qwix.apply_lora_to_model(task.module, qwix.LoraProvider(lrules))
  lora_abstract = jax.eval_shape(
    lora_model.init, jax.random.key(0), *task.example
  )['params']
  optimizer = optax.adamw(1e-3)
  objective = finetune.smollm2_objective(task, task.train_data, 1, 512)
  adapters, frozen = training.split_adapters(
    jax.eval_shape(
      lambda p: objective.to_train(lora.to_lora(p, lora_abstract, lrules)),
      params,
    )
  )
  step = finetune.compile_step(
    objective,
    lrules,
    optimizer,
    adapters,
    jax.eval_shape(optimizer.init, adapters),
    frozen,
  )
  quantized_fp32 = sum(
    w.size * 4
    for p, w in jax.tree_util.tree_flatten_with_path(task.params)[0]
    if 'layers_' in str(p[0]) and p[-1].key == 'kernel'
  )
  ratio = finetune.temp_vs_fp32(step, task.params)
  assert ratio <= 0.5, ratio
  assert step.memory_analysis().temp_size_in_bytes < quantized_fp32


@pytest.mark.slow
def test_finetune_minilm_distillation_cli(tmp_path, monkeypatch, capsys):
  task = tasks.minilm_task(n_calib=32, n_eval=32)
  monkeypatch.setitem(tasks.TASKS, 'minilm', lambda *a, **k: task)
  out = tmp_path / 'ft.json'
  cli.main(
    [
      'finetune',
      '--model',
      'minilm',
      '--steps',
      '2',
      '--rank',
      '16',
      '--init',
      'zero',
      '--json',
      str(out),
    ]
  )
  by = {(r['init'], r['steps']): r for r in json.loads(out.read_text())}
  assert '| init | steps | 1-cos |' in capsys.readouterr().out
  assert by[('FP', None)]['1-cos'] < 1e-6
  assert by[('zero (QLoRA)', 0)]['1-cos'] == pytest.approx(
    by[('PTQ', None)]['1-cos'], rel=1e-3
  )
  # Distillation toward the float embeddings lowers the held-out distance.
  assert by[('zero (QLoRA)', 2)]['1-cos'] < by[('zero (QLoRA)', 0)]['1-cos']


@pytest.mark.parametrize(
  'n_calib,shapes',
  [
    (256, [(1, 256)]),  # smaller than a window: one shorter window
    (2548, [(4, 512), (1, 500)]),  # the tokens past the last full window
  ],
)
def test_smollm2_calibration_windows_keep_every_token(n_calib, shapes):
  task = tasks.smollm2_task(n_calib=n_calib, n_eval=512)
  assert [b[0].shape for b in task.calib_batches] == shapes
  assert sum(b[0].size for b in task.calib_batches) == n_calib
