"""`lqer finetune`: QLoRA from zero adapters or from the reconstruction,
held-out quality along the way.

    lqer finetune --bits 4 --tile-size 128 --rank 32 --init zero qera

fine-tunes SmolLM2's Qwix QLoRA adapters from zero or from the
reconstruction and prints held-out perplexity per init and step count.

Every init trains the same quantized base (the base lqer built: RTN or
GPTQ) on the same batches in the same order, with the same optimizer,
learning rate, alpha and seed. 'zero' is Qwix's own LoRA init (lora_a
he_uniform, lora_b zeros); 'svd' / 'l2qer' / 'qera' start the adapters at
the LQER / L2QER / QERA factors (`lqer.to_lora`).

Objectives: SmolLM2, next-token loss on windows of 512 tokens (held out:
perplexity); MiniLM, distillation of the float model's sentence embeddings,
mean(1 - cos(e, e_fp)) on training sentences padded to 64 tokens (held
out: the same mean on the evaluation sentences, as `lqer eval` scores it).
"""

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from tqdm.auto import tqdm

from lqer.checkpoints import tree as checkpoint
from lqer.cli import common
from lqer.cli import tasks
from lqer.lora import adapters as lora
from lqer.lora import training
from lqer.quant import recipes
from models import smollm2

INIT_LABELS = {
  'zero': 'zero (QLoRA)',
  'svd': 'LQER',
  'l2qer': 'L2QER',
  'qera': 'QERA',
}
SENTENCE_TOKENS = 64  # minilm: each training sentence padded / cut to this
# Defaults of `lqer finetune`, the same for every init (see README): the
# learning rate and batch at which zero-init QLoRA trained best of those
# measured (benchmarks/finetune_lr.py for SmolLM2).
DEFAULT_STEPS = 64
DEFAULTS = {
  'smollm2': dict(lr=1e-3, batch_tokens=512),
  'minilm': dict(lr=1e-4, batch_tokens=2048),
}


@dataclasses.dataclass
class FinetuneRow:
  """One line of the table and one --json record."""

  init: str
  steps: int | None
  metric: str  # 'perplexity' (smollm2) or '1-cos' (minilm)
  value: float
  train_loss: float | None = None  # mean over the last quarter of steps
  step_seconds: float | None = None  # median, compile excluded
  # On each init's step-0 row: trainable params, and the compiled step's
  # temp bytes over the model's float32 weight bytes.
  trainable_params: int | None = None
  step_temp_vs_fp32: float | None = None

  def record(self) -> dict:
    """The --json record: every field, and the value under its metric."""
    return dataclasses.asdict(self) | {self.metric: self.value}


@dataclasses.dataclass
class Objective:
  """How a task trains: one batch per step, the param layout the step sees
  (`to_train` / `from_train`), and loss(lora_rules) -> loss(params, batch)."""

  batches: Sequence[Any]
  loss: Callable[[Sequence[Any]], Callable[[Any, Any], jax.Array]]
  to_train: Callable[[dict], dict] = lambda p: p
  from_train: Callable[[dict], dict] = lambda p: p


def step_counts(n: int) -> list[int]:
  """0, N/4, N/2, N (rounded down, without repeats)."""
  return sorted({0, n // 4, n // 2, n})


def windows_for_steps(
  train_ids: np.ndarray, steps: int, batch_tokens: int
) -> np.ndarray:
  """(steps, batch, WINDOW) token windows, in order, cycling over the
  text."""
  per_step = max(1, batch_tokens // common.WINDOW)
  n = len(train_ids) // common.WINDOW
  if n == 0:
    raise ValueError(
      f'training text has {len(train_ids)} tokens; need at'
      f' least one window of {common.WINDOW}'
    )
  windows = np.asarray(train_ids[: n * common.WINDOW]).reshape(n, common.WINDOW)
  order = np.arange(steps * per_step) % n
  return windows[order].reshape(steps, per_step, common.WINDOW)


def next_token_loss(
  hidden: jax.Array, logits_of, windows: jax.Array, chunk: int = 128
) -> jax.Array:
  """Mean NLL of tokens 1..W-1 given the earlier tokens of each window:
  mean(logsumexp(z) - z[target]), z = logits_of(h), computed for `chunk`
  positions at a time and recomputed in the backward pass, so the full
  (batch, W, vocab) logits never exist."""
  h, targets = hidden[:, :-1], windows[:, 1:]
  n = h.shape[1]
  pad = -n % chunk
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  mask = jnp.arange(n + pad) < n
  split = lambda x: jnp.moveaxis(
    x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0
  )

  @jax.checkpoint
  def chunk_nll(args):
    h_c, t_c, m_c = args
    logits = logits_of(h_c).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * m_c)

  masks = jnp.broadcast_to(mask, targets.shape)
  total = jnp.sum(
    jax.lax.map(chunk_nll, (split(h), split(targets), split(masks)))
  )
  return total / (h.shape[0] * n)


def smollm2_objective(
  task, train_ids, steps: int, batch_tokens: int
) -> Objective:
  """Next-token loss; blocks scanned and rematerialised (`_scanned_loss`)."""
  n_layers = task.module.config.num_layers
  return Objective(
    batches=windows_for_steps(train_ids, steps, batch_tokens),
    loss=lambda lrules: _scanned_loss(task.module.config, lrules),
    to_train=lambda p: smollm2.stack_layers(p, n_layers),
    from_train=lambda p: smollm2.unstack_layers(p, n_layers),
  )


def minilm_objective(
  task, sentences: Sequence[str], steps: int, batch_tokens: int
) -> Objective:
  """mean(1 - cos(e, e_fp)) against the float model's embeddings."""
  from models import minilm  # pylint: disable=g-import-not-at-top

  per_step = max(1, batch_tokens // SENTENCE_TOKENS)
  if not sentences:
    raise ValueError('no training sentences')
  order = np.arange(steps * per_step) % len(sentences)
  tokenizer = minilm.load_minilm()[2]
  fp_forward = jax.jit(
    lambda ids, mask: task.module.apply({'params': task.params}, ids, mask)
  )
  batches = []
  for i in range(steps):
    ids, mask = minilm.tokenize(
      tokenizer,
      [sentences[j] for j in order[i * per_step : (i + 1) * per_step]],
      max_len=SENTENCE_TOKENS,
    )
    pad = ((0, 0), (0, SENTENCE_TOKENS - ids.shape[1]))
    ids, mask = np.pad(ids, pad), np.pad(mask, pad)
    batches.append((ids, mask, fp_forward(ids, mask)))

  def loss(lrules):
    lora_model = qwix.apply_lora_to_model(
      task.module, qwix.LoraProvider(lrules)
    )
    return lambda params, batch: jnp.mean(
      1.0
      - jnp.sum(
        lora_model.apply({'params': params}, batch[0], batch[1]) * batch[2],
        axis=-1,
      )
    )

  return Objective(batches=batches, loss=loss)


OBJECTIVES = {'smollm2': smollm2_objective, 'minilm': minilm_objective}


def finetune_rows(
  task,
  bits: int,
  tile_size,
  rank: int,
  inits: Sequence[str],
  *,
  base: str = 'rtn',
  steps: int,
  batch_tokens: int,
  lr: float,
  alpha: float,
  train_data,
  seed: int = 0,
  save_dir=None,
  with_reference=True,
) -> Iterator[FinetuneRow]:
  """Yields the FP and PTQ rows (if with_reference), then for each init one
  row per step count in `step_counts(steps)`."""
  metric = task.metric
  value = lambda module, params: task.score(module, params)[metric]
  stats = None
  if base != 'rtn' or set(inits) & {'l2qer', 'qera'}:
    stats = tasks.calibration_statistics(
      task,
      recipes.build_rules(
        task.params, task.module_path, bits, tile_size, 1, 'qera'
      )[0],
    )
  if with_reference:
    yield FinetuneRow('FP', None, metric, value(task.module, task.params))
    ptq_rules, _ = recipes.build_rules(
      task.params, task.module_path, bits, tile_size, None, 'svd'
    )
    ptq_model, ptq_params, _ = tasks.quantize(task, ptq_rules, stats, base)
    yield FinetuneRow(
      'PTQ' if base == 'rtn' else base.upper(),
      None,
      metric,
      value(ptq_model, ptq_params),
    )

  objective = OBJECTIVES[task.name](task, train_data, steps, batch_tokens)
  optimizer = optax.adamw(lr)
  counts = step_counts(steps)
  first_lqer = None
  for init in inits:
    rules, _ = recipes.build_rules(
      task.params,
      task.module_path,
      bits,
      tile_size,
      rank,
      'svd' if init == 'zero' else init,
    )
    if init != 'zero' or first_lqer is None:
      lqer_model, params, _ = tasks.quantize(task, rules, stats, base)
      first_lqer = first_lqer or params
    lrules = lora.lora_rules(rules, alpha)
    lora_model = qwix.apply_lora_to_model(
      task.module, qwix.LoraProvider(lrules)
    )
    key = jax.random.key(seed)
    lora_abstract = jax.eval_shape(lora_model.init, key, *task.example)[
      'params'
    ]
    lora_params = lora.to_lora(
      first_lqer if init == 'zero' else params, lora_abstract, lrules
    )
    if init == 'zero':  # Qwix's own adapter init on the same base
      fresh = jax.jit(lora_model.init)(key, *task.example)['params']
      lora_params = training.merge_adapters(
        lora_params, training.split_adapters(fresh)[0]
      )
    adapters, frozen = training.split_adapters(objective.to_train(lora_params))
    opt_state = optimizer.init(adapters)
    step = compile_step(
      objective, lrules, optimizer, adapters, opt_state, frozen
    )
    score = lambda a: value(
      lora_model, objective.from_train(training.merge_adapters(frozen, a))
    )
    yield FinetuneRow(
      INIT_LABELS[init],
      0,
      metric,
      score(adapters),
      trainable_params=sum(x.size for x in jax.tree.leaves(adapters)),
      step_temp_vs_fp32=temp_vs_fp32(step, task.params),
    )
    losses, seconds = [], []
    bar = tqdm(range(steps), desc=f'finetune {init}', leave=False)
    for i in bar:
      start = time.perf_counter()
      try:
        adapters, opt_state, loss = step(
          adapters, opt_state, frozen, objective.batches[i]
        )
      except FloatingPointError as e:
        raise FloatingPointError(f'lqer finetune --init {init}: {e}') from e
      losses.append(float(loss))
      seconds.append(time.perf_counter() - start)
      bar.set_postfix(loss=f'{losses[-1]:.3f}')
      if i + 1 in counts:
        yield FinetuneRow(
          INIT_LABELS[init],
          i + 1,
          metric,
          score(adapters),
          float(np.mean(losses[-max(1, steps // 4) :])),
          float(np.median(seconds)),
        )
    if save_dir is not None and init != 'zero':
      abstract = jax.eval_shape(lqer_model.init, key, *task.example)['params']
      tuned = lora.from_lora(
        objective.from_train(training.merge_adapters(frozen, adapters)),
        abstract,
        lrules,
      )
      checkpoint.save(
        tasks.subdir(save_dir, bits, tile_size, init, rank),
        tuned,
        tasks.fingerprint(task.name, rules, base),
      )


def compile_step(
  objective: Objective, lrules, optimizer, adapters, opt_state, frozen
):
  """The objective's training step, compiled for its batches' shape."""
  step = training.train_step(objective.loss(lrules), optimizer)
  return step.compile(adapters, opt_state, frozen, objective.batches[0])


def temp_vs_fp32(compiled, fp_params) -> float:
  """A compiled step's temp bytes (XLA memory_analysis) over the float32
  bytes of the model's weights."""
  fp32 = sum(x.size * 4 for x in jax.tree.leaves(fp_params))
  return compiled.memory_analysis().temp_size_in_bytes / fp32


def _scanned_loss(config, lrules):
  """loss(stacked LoRA params, windows): SmolLM2 with its blocks scanned
  (one Qwix LoRA block, rules as for the whole model), chunked logits."""
  block = qwix.apply_lora_to_model(
    smollm2.SingleBlock(config), qwix.LoraProvider(lrules)
  )
  return lambda params, windows: next_token_loss(
    smollm2.scanned_hidden(block.apply, config, params, windows),
    lambda h: smollm2.output_logits(params, h),
    windows,
  )


def finetune_table(rows: Sequence[FinetuneRow]) -> str:
  """Markdown table: init, steps, held-out metric, training loss."""
  fmt = lambda v, f: '-' if v is None else f.format(v)
  lines = [
    f'| init | steps | {rows[0].metric} | train loss |',
    '|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
      f'| {r.init} | {fmt(r.steps, "{}")} |'
      f' {r.value:.4f} | {fmt(r.train_loss, "{:.4f}")} |'
    )
  return '\n'.join(lines)


def tokens_per_step(task_name: str, batch_tokens: int) -> int:
  """Tokens in one training batch: whole windows (smollm2) or padded
  sentences (minilm), at least one."""
  unit = common.WINDOW if task_name == 'smollm2' else SENTENCE_TOKENS
  return max(1, batch_tokens // unit) * unit


def steps_per_second(rows: Sequence[FinetuneRow]) -> float | None:
  """Training throughput: one over the median step time."""
  times = [r.step_seconds for r in rows if r.step_seconds]
  return 1.0 / float(np.median(times)) if times else None


def add_parser(sub):
  """The `finetune` subcommand's arguments."""
  f = sub.add_parser(
    'finetune', help='QLoRA from zero vs from the reconstruction, print a table'
  )
  f.add_argument(
    '--model',
    choices=sorted(OBJECTIVES),
    default='smollm2',
    help='smollm2: next-token loss, held-out perplexity; minilm:'
    ' distillation of the float embeddings, held-out 1-cos',
  )
  common.add_quantizer_arguments(f)
  f.add_argument('--rank', type=int, default=32)
  f.add_argument(
    '--base',
    choices=['rtn', 'gptq'],
    default='rtn',
    help='AWQ bases carry scales Qwix LoRA cannot apply',
  )
  f.add_argument(
    '--init', nargs='+', default=['zero', 'qera'], choices=list(INIT_LABELS)
  )
  f.add_argument('--steps', type=int, default=DEFAULT_STEPS)
  f.add_argument(
    '--batch-tokens',
    type=int,
    help='tokens per step (smollm2: windows of 512, default'
    ' 512; minilm: sentences padded to 64, default 2048)',
  )
  f.add_argument(
    '--lr',
    type=float,
    help='optax.adamw learning rate (default: smollm2 1e-3, minilm 1e-4)',
  )
  f.add_argument(
    '--alpha',
    type=float,
    default=None,
    help='LoRA alpha (default: the rank, so alpha / rank = 1)',
  )
  f.add_argument('--seed', type=int, default=0)
  f.add_argument(
    '--train-text',
    help='UTF-8 text file to train on (default:'
    ' the bundled prose that calibration and evaluation do not'
    ' read)',
  )
  common.add_text_arguments(f, common.DEFAULT_FINETUNE_EVAL_TOKENS)
  f.add_argument('--json', help='write one record per row to this file')
  f.add_argument(
    '--save',
    help="write each reconstruction init's tuned"
    ' params under DIR, for lqer eval --load DIR',
  )


def check_args(args) -> None:
  """SystemExit naming the flag unless --rank, --steps, --batch-tokens
  (ints), --lr and --alpha (floats; alpha None = the rank) are finite and
  > 0: checked before any model loads."""
  for flag in ('rank', 'steps', 'batch_tokens', 'lr', 'alpha'):
    value = getattr(args, flag)
    if value is None:
      continue
    kind = 'an int' if isinstance(value, int) else 'a finite number'
    if not (math.isfinite(value) and value > 0):
      raise SystemExit(
        f'lqer finetune: --{flag.replace("_", "-")} must be {kind} > 0,'
        f' got {value!r}'
      )


def finetune_command(args) -> list:
  """Runs `lqer finetune`: prints the table, returns its rows."""
  for name, value in DEFAULTS[args.model].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  check_args(args)
  task = tasks.TASKS[args.model](
    common.read_text(args.calib_text),
    common.read_text(args.eval_text),
    n_eval=args.eval_tokens if args.model == 'smollm2' else args.eval_sentences,
  )
  train_data = (
    task.encode(common.read_text(args.train_text))
    if args.train_text
    else task.train_data
  )
  alpha = float(args.rank if args.alpha is None else args.alpha)
  common.echo_command('finetune')
  rows = []
  try:
    for row in finetune_rows(
      task,
      args.bits,
      args.tile_size or None,
      args.rank,
      args.init,
      base=args.base,
      steps=args.steps,
      batch_tokens=args.batch_tokens,
      lr=args.lr,
      alpha=alpha,
      train_data=train_data,
      seed=args.seed,
      save_dir=args.save,
    ):
      rows.append(row)
      print(
        f'  {row.init:12s} steps={row.steps} {row.metric}={row.value:.4f}',
        file=sys.stderr,
        flush=True,
      )
  except FloatingPointError as e:
    raise SystemExit(f'{e} (--lr {args.lr:g}, --alpha {alpha:g})') from None
  print(finetune_table(rows))
  first = next(r for r in rows if r.trainable_params)
  per_step = tokens_per_step(args.model, args.batch_tokens)
  speed = steps_per_second(rows) * per_step
  print(
    f'\n{args.model} W{args.bits} g{args.tile_size} rank {args.rank},'
    f' alpha {alpha:g}, optax.adamw lr {args.lr:g}, {per_step}'
    f' tokens/step, {len(train_data)} training'
    f' {"tokens" if args.model == "smollm2" else "sentences"} available.'
    f'\nTrainable params {first.trainable_params:,}; training step'
    f' {speed:.0f} tokens/s; compiled step temp memory'
    f' {first.step_temp_vs_fp32:.2f}x the float32 weights.'
  )
  common.write_json(args.json, [r.record() for r in rows])
  return rows
