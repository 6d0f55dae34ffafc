"""Quantize a bundled real model with every method and measure its quality.

Two tasks, each with fixed, disjoint calibration and evaluation data:

* smollm2: SmolLM2-135M-Instruct, perplexity over windows of 512 tokens of
  English prose (CPython's pydoc topics, or the user's text files).
* minilm: all-MiniLM-L6-v2 sentence embeddings, mean (1 - cosine) to the FP
  embedding and the fraction of nearest-neighbour retrievals that agree
  with FP.

`run` yields one `Row` per configuration: FP, plain Qwix PTQ, then each
method x rank, all on the same base quantizer settings.
"""

import dataclasses
import re
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lqer import allocation
from lqer import calibration
from lqer import checkpoint
from lqer.calibration import LqerCalibrationProvider
from lqer.packing import pack_params
from lqer.params import lqer_quantize_params
from lqer.provider import LqerProvider
from lqer.reporting import report as make_report
from lqer.rule import LqerRule
from lqer.weight import WithLqer

METHOD_LABELS = {'svd': 'LQER', 'l2qer': 'L2QER', 'qera': 'QERA',
                 'svdquant': 'SVDQuant', 'smoothquant': 'SmoothQuant',
                 'svdquant-qera': 'SVDQuant+QERA'}
# Rows of `lqer eval` that need activation quantization (--act-bits).
ACT_METHODS = ('svdquant', 'smoothquant', 'svdquant-qera')
# SVDQuant's smoothing strength per (model, activation bits), searched with
# benchmarks/smooth_alpha.py on the calibration data (W4 g128 rank 32;
# 4-bit: SVDQuant alone, 8-bit: half the rank on QERA of the residual).
DEFAULT_SMOOTH_ALPHA = {('smollm2', 4): 0.9, ('smollm2', 8): 0.3,
                        ('minilm', 4): 0.6, ('minilm', 8): 0.3}
# svdquant-qera's QERA part of the rank, per activation bits: at 8 bits the
# weight's error dominates and half the rank on it scored best (same search).
DEFAULT_ERROR_RANK_SHARE = {4: 0.25, 8: 0.5}


@dataclasses.dataclass
class Row:
  """One line of the comparison table (and one --json record)."""

  model: str
  method: str
  base: str
  bits: int | None
  tile_size: int | None
  rank: int | str | None  # 'auto': allocated under --budget
  metric: str
  value: float
  bits_per_weight: float | None
  offline_seconds: float | None
  extra: dict[str, float] = dataclasses.field(default_factory=dict)
  act_bits: int | None = None
  # Bits per weight minus the PTQ row's at the same base settings.
  extra_bits: float | None = None
  calib: int | None = None  # calibration tokens (smollm2) / sentences


@dataclasses.dataclass
class Task:
  """A model, its data, and how to calibrate and score it."""

  name: str
  module: Any
  params: Any
  example: Any  # one model input, for init / eval_shape
  calib_batches: list[Any]  # model inputs, each a tuple of arrays
  metric: str
  score: Callable[[Any, Any], dict[str, float]]  # (module, params) -> metrics
  module_path: str  # regex of the weights to quantize
  # For `lqer finetune`: text -> training data (smollm2: token ids; minilm:
  # sentences), and the default training data: the part of the bundled
  # prose that neither calibration nor evaluation reads.
  encode: Callable[[str], Any] | None = None
  train_data: Any = None
  # Batches of the --budget rows' output-gradient statistics
  # (`calibration.output_gradients`; default: the calibration batches), and
  # the model output's kind ('softmax': logits).
  gradient_batches: list[Any] | None = None
  output: str = 'gaussian'


def smollm2_task(calib_text=None, eval_text=None, n_calib=8192,
                 n_eval=20480, window=512) -> Task:
  """SmolLM2 perplexity on prose; weights are Q4_1-dequantized (GGUF)."""
  from models import smollm2, text  # pylint: disable=g-import-not-at-top
  module, params, tokenizer = smollm2.load_smollm2()
  encode = lambda t: np.asarray(tokenizer.encode(t).ids, np.int32)
  prose = encode(text.prose_text())
  if calib_text is None and eval_text is None:
    calib, evals = text.split_tokens(prose, n_calib, n_eval)
  else:
    calib = (prose if calib_text is None else encode(calib_text))[:n_calib]
    evals = (prose if eval_text is None else encode(eval_text))[-n_eval:]
  train = prose[len(calib) if calib_text is None else 0:
                len(prose) - (len(evals) if eval_text is None else 0)]
  if len(evals) < window:
    raise ValueError(f'evaluation text has {len(evals)} tokens; need at least'
                     f' one window of {window}')
  # Windows of `window` tokens (fewer if the calibration is smaller), four
  # per batch, and the tokens left over as a last, shorter window.
  if not len(calib):
    raise ValueError('calibration text has no tokens')
  width = min(window, len(calib))
  full = len(calib) // width * width
  windows = calib[:full].reshape(-1, width)
  calib_batches = [(windows[i:i + 4],) for i in range(0, len(windows), 4)]
  if full < len(calib):
    calib_batches.append((calib[None, full:],))
  return Task(
      name='smollm2', module=module, params=params,
      example=(jnp.zeros((1, 8), jnp.int32),),
      calib_batches=calib_batches,
      metric='perplexity',
      score=lambda m, p: {'perplexity': smollm2.perplexity(
          m, p, evals, window, progress=True)},
      module_path=r'layers_\d+/(attn|mlp)/.*',
      encode=encode, train_data=train,
      # --budget's output gradients: 4 windows spread over the calibration,
      # 256 tokens each (one backward pass).
      gradient_batches=[(windows[::max(1, len(windows) // 4), :256][:4],)],
      output='softmax',
  )


def minilm_task(calib_text=None, eval_text=None, n_calib=256,
                n_eval=512) -> Task:
  """MiniLM embedding fidelity on English sentences."""
  from models import minilm, text  # pylint: disable=g-import-not-at-top
  module, params, tokenizer = minilm.load_minilm()
  prose = text.sentences(text.num_sentences())
  if calib_text is None and eval_text is None:
    calib, evals = text.split_sentences(n_calib, n_eval)
  else:
    calib = list(text.text_sentences(calib_text or text.prose_text()))
    evals = list(text.text_sentences(eval_text or text.prose_text()))
    calib, evals = calib[:n_calib], evals[-n_eval:]
  train = prose[len(calib) if calib_text is None else 0:
                len(prose) - (len(evals) if eval_text is None else 0)]
  if len(evals) < 2:
    raise ValueError('evaluation text has fewer than 2 sentences')
  fp = minilm.encode(module, params, tokenizer, evals)

  def score(m, p):
    emb = minilm.encode(m, p, tokenizer, evals)
    cos = np.sum(emb * fp, axis=1)
    return {'1-cos': float(np.mean(1.0 - cos)),
            'nn_agree': float(np.mean(_nearest(emb) == _nearest(fp)))}

  batches = [minilm.tokenize(tokenizer, calib[i:i + 32])
             for i in range(0, len(calib), 32)]
  return Task(
      name='minilm', module=module, params=params,
      example=minilm.tokenize(tokenizer, ['a b']), calib_batches=batches,
      metric='1-cos', score=score, module_path=r'layer_\d+/.*',
      encode=lambda t: list(text.text_sentences(t)), train_data=train,
  )


def _nearest(emb):
  sim = emb @ emb.T
  np.fill_diagonal(sim, -np.inf)
  return np.argmax(sim, axis=1)


TASKS = {'smollm2': smollm2_task, 'minilm': minilm_task}


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
    return dict(method='svdquant', rank=rank - error_rank,
                error_rank=error_rank)
  return dict(method=method, rank=rank)


def build_rules(fp_params, module_path: str, bits: int, tile_size, rank,
                method: str, act_bits=None,
                **rule_kw) -> tuple[list[LqerRule], dict]:
  """Rules for bits / tile size / rank, with per-channel fallback.

  A weight whose contracting size (the kernel's first axis) is not a multiple
  of tile_size gets per-channel scales through an earlier, more specific
  rule. act_bits: dynamic activation quantization of the weights' inputs
  (None: weight-only).
  Returns the rules and {'per-group': [...], 'per-channel': [...]}.
  """
  qtype = int_qtype(bits)
  handled = {'per-group': [], 'per-channel': []}
  for path, w in flax.traverse_util.flatten_dict(fp_params).items():
    name = '/'.join(map(str, path[:-1]))
    if path[-1] != 'kernel' or not re.fullmatch(module_path, name):
      continue
    fits = tile_size is None or w.shape[0] % tile_size == 0
    handled['per-group' if fits and tile_size else 'per-channel'].append(name)
  common = dict(weight_qtype=qtype, act_qtype=int_qtype(act_bits),
                rank=rank, method=method, **rule_kw)
  if act_bits is not None:
    # The weights' inputs (both models' Dense layers run dot_general); the
    # attention's activation x activation einsums stay float.
    common['op_names'] = ('dot_general',)
  rules = []
  if tile_size and handled['per-channel']:
    exact = '|'.join(re.escape(n) for n in handled['per-channel'])
    rules.append(LqerRule(module_path=f'({exact})', **common))
  rules.append(LqerRule(module_path=module_path, tile_size=tile_size,
                        **common))
  return rules, handled


def calibrate(task: Task, rules) -> Any:
  """Runs the float model under LqerCalibrationProvider over the batches."""
  cal = qwix.quantize_model(task.module, LqerCalibrationProvider(rules))
  return calibration.run(cal, task.params, task.calib_batches, progress=True)


def output_gradients(task: Task, rules, stats):
  """stats with the output-gradient statistics of `task.gradient_batches`
  (`calibration.output_gradients`); prints their seconds."""
  start = time.perf_counter()
  grad_model = qwix.quantize_model(
      task.module, LqerCalibrationProvider(rules, output_gradients=True))
  stats = calibration.output_gradients(
      grad_model, task.params, task.gradient_batches or task.calib_batches,
      stats, output=task.output, progress=True)
  print(f'output-gradient statistics: {time.perf_counter() - start:.1f} s',
        file=sys.stderr)
  return stats


def quantize(task: Task, rules, stats, base='rtn', compute_dtype=jnp.float32,
             budget_bits=None):
  """(LQER model, params, offline seconds) for the rules. The seconds are
  a cold pass, as in a fresh process: compile caches are cleared first, so
  a row does not reuse what an earlier row compiled."""
  model = qwix.quantize_model(
      task.module, LqerProvider(rules, compute_dtype=compute_dtype))
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            *task.example)['params']
  jax.clear_caches()
  start = time.perf_counter()
  params = lqer_quantize_params(task.params, abstract, calibration=stats,
                                base=base, budget_bits=budget_bits,
                                progress=True)
  jax.block_until_ready(params)
  return model, params, time.perf_counter() - start


def fingerprint(task_name, rules, base):
  return {'model': task_name, 'base': base, 'rules': repr(rules)}


def uniform_rank_for(params, num_weights, extra_bits) -> int:
  """The uniform rank whose factors spend `extra_bits` per weight on the
  weights of `params` that carry factors (nearest, at least 1)."""
  per_rank = sum(
      allocation.component_bits(w.layout, w.rule) for w in jax.tree.leaves(
          params, is_leaf=lambda x: isinstance(x, WithLqer))
      if isinstance(w, WithLqer)) / num_weights
  return max(1, round(extra_bits / per_rank))


def run(task: Task, bits: int, tile_size, ranks: Sequence[int],
        methods: Sequence[str], base: str = 'rtn', save_dir=None,
        load_dir=None, with_fp=True, compute_dtype=jnp.float32, pack=False,
        act_bits=None, error_rank=None, budget=None, calib=None,
        **rule_kw) -> Iterator[Row]:
  """Yields FP (if with_fp), PTQ and method x rank rows for one bits / tile
  setting. compute_dtype / pack: the inference matmul (float32 unpacked
  gives Qwix's numbers). act_bits: every row but FP quantizes activations
  dynamically. Methods are `METHOD_LABELS`' keys; 'smoothquant' has no rank
  and runs once. budget: per method, a row with ranks allocated under that
  many extra bits per weight (terms valued by the output-gradient
  statistics of `task.gradient_batches`, gathered once, before the rows),
  then the uniform rank spending the same bits.
  rule_kw: more LqerRule fields (factor_qtype, refine_iters, ...)."""
  if act_bits is None and set(methods) & set(ACT_METHODS):
    raise ValueError(f'methods {sorted(set(methods) & set(ACT_METHODS))}'
                     ' smooth activations for their quantization; give'
                     ' act_bits (lqer eval --act-bits 4 or 8)')
  maybe_pack = pack_params if pack else lambda params: params
  ptq_bpw = None
  row = lambda method, rank, scores, bpw=None, secs=None: Row(
      task.name, method, base, bits if method != 'FP' else None,
      tile_size if method != 'FP' else None, rank, task.metric,
      scores[task.metric], bpw, secs,
      {k: v for k, v in scores.items() if k != task.metric},
      act_bits if method != 'FP' else None,
      None if method == 'FP' or ptq_bpw is None else bpw - ptq_bpw, calib)
  if with_fp:
    yield row('FP', None, task.score(task.module, task.params), 32.0)
  rules_for = lambda rank, method, **kw: build_rules(
      task.params, task.module_path, bits, tile_size, rank, method,
      act_bits=act_bits, **kw)[0]
  rules = rules_for(None, 'svd', **rule_kw)
  stats = calibrate(task, rules_for(1, 'qera'))
  ptq_model, ptq_params, secs = quantize(task, rules, stats, base,
                                            compute_dtype)
  ptq_total = make_report(task.params, ptq_params).total()
  bpw = ptq_bpw = ptq_total['bits_per_weight']
  yield row('PTQ' if base == 'rtn' else base.upper(), None,
            task.score(ptq_model, maybe_pack(ptq_params)), bpw, secs)
  num_weights = ptq_total['num_weights']
  if budget is not None:
    stats = output_gradients(task, rules_for(1, 'qera'), stats)
  for method in methods if budget is not None else ():
    model, params, secs = quantize(
        task, rules_for('auto', method, **rule_kw), stats, base,
        compute_dtype, allocation.Budget(budget))
    bpw = make_report(task.params, params).total()['bits_per_weight']
    yield row(METHOD_LABELS[method], 'auto',
              task.score(model, maybe_pack(params)), bpw, secs)
    uniform = uniform_rank_for(params, num_weights, bpw - ptq_bpw)
    model, params, secs = quantize(task, rules_for(uniform, method, **rule_kw),
                                   stats, base, compute_dtype)
    bpw = make_report(task.params, params).total()['bits_per_weight']
    yield row(METHOD_LABELS[method], uniform,
              task.score(model, maybe_pack(params)), bpw, secs)
  for i, rank in enumerate(ranks):
    for method in methods:
      if method == 'smoothquant' and i:
        continue
      kw = method_rule_kw(method, rank, error_rank, act_bits)
      label_rank = 0 if method == 'smoothquant' else rank
      where = lambda root, m=method, r=label_rank: subdir(
          root, bits, tile_size, m, r, act_bits)
      rules = rules_for(**kw, **rule_kw)
      fp = fingerprint(task.name, rules, base)
      if load_dir is not None:
        model = qwix.quantize_model(
            task.module, LqerProvider(rules, compute_dtype=compute_dtype))
        abstract = jax.eval_shape(model.init, jax.random.key(0),
                                  *task.example)['params']
        params = checkpoint.load(where(load_dir), abstract, fp)
        secs = None
      else:
        model, params, secs = quantize(task, rules, stats, base,
                                          compute_dtype)
      if save_dir is not None:
        checkpoint.save(where(save_dir), params, fp)
      bpw = make_report(task.params, params).total()['bits_per_weight']
      yield row(METHOD_LABELS[method], label_rank,
                task.score(model, maybe_pack(params)), bpw, secs)


def subdir(root, bits, tile_size, method, rank, act_bits=None):
  act = '' if act_bits is None else f'a{act_bits}'
  return f'{root}/w{bits}{act}_g{tile_size or 0}_{method}_r{rank}'
