"""The bundled models as evaluation tasks, and the steps every command takes.

Two tasks, each with fixed, disjoint calibration and evaluation data:

* smollm2: SmolLM2-135M-Instruct, perplexity over windows of 512 tokens of
  English prose (CPython's pydoc topics, or the user's text files).
* minilm: all-MiniLM-L6-v2 sentence embeddings, mean (1 - cosine) to the FP
  embedding and the fraction of nearest-neighbour retrievals that agree
  with FP.

`lqer eval` (`eval.eval_rows`) and `lqer finetune` calibrate, quantize and
score them with the functions below.
"""

import dataclasses
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lqer.cli import common
from lqer.offline.params import lqer_quantize_params
from lqer.providers import calibration
from lqer.providers.calibration import LqerCalibrationProvider
from lqer.providers.inference import LqerProvider
from lqer.quant.bits import component_bits
from lqer.quant.weight import WithLqer


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
  # `lqer eval --tune-steps`: n -> the batches factors are tuned on, from
  # the first n calibration tokens (smollm2) or sentences (minilm).
  tune_batches: Callable[[int], list[Any]] | None = None


# The weights `lqer eval` quantizes in SmolLM2: the blocks' projections.
SMOLLM2_PATHS = r'layers_\d+/(attn|mlp)/.*'


def smollm2_task(
  calib_text=None,
  eval_text=None,
  n_calib=common.DEFAULT_CALIB_TOKENS,
  n_eval=common.DEFAULT_EVAL_TOKENS,
  window=common.WINDOW,
  quantize_head=False,
) -> Task:
  """SmolLM2 perplexity on prose; weights are Q4_1-dequantized (GGUF).

  quantize_head: the tied LM head untied (`llama.untie_head`) and matched
  by the rules like the blocks' projections (`--quantize-head`)."""
  from models import llama  # pylint: disable=g-import-not-at-top
  from models import smollm2  # pylint: disable=g-import-not-at-top
  from models import text  # pylint: disable=g-import-not-at-top

  module, params, tokenizer = smollm2.load_smollm2()
  if quantize_head:
    module, params = llama.untie_head(module, params)
  encode = lambda t: np.asarray(tokenizer.encode(t).ids, np.int32)
  calib, evals, train = split_smollm2_tokens(
    encode(text.prose_text()), calib_text, eval_text, n_calib, n_eval, encode
  )
  if len(evals) < window:
    raise ValueError(
      f'evaluation text has {len(evals)} tokens; need at least'
      f' one window of {window}'
    )
  # Windows of `window` tokens (fewer if the calibration is smaller), four
  # per batch, and the tokens left over as a last, shorter window.
  if not len(calib):
    raise ValueError('calibration text has no tokens')
  width = min(window, len(calib))
  full = len(calib) // width * width
  windows = calib[:full].reshape(-1, width)
  calib_batches = [(windows[i : i + 4],) for i in range(0, len(windows), 4)]
  if full < len(calib):
    calib_batches.append((calib[None, full:],))
  return Task(
    name='smollm2',
    module=module,
    params=params,
    example=(jnp.zeros((1, 8), jnp.int32),),
    calib_batches=calib_batches,
    metric='perplexity',
    score=lambda m, p: {
      'perplexity': smollm2.perplexity(m, p, evals, window, progress=True)
    },
    module_path=SMOLLM2_PATHS + ('|lm_head' if quantize_head else ''),
    encode=encode,
    train_data=train,
    # --budget's output gradients: 4 windows spread over the calibration,
    # 256 tokens each (one backward pass).
    gradient_batches=[(windows[:: max(1, len(windows) // 4), :256][:4],)],
    output='softmax',
    tune_batches=lambda n: tuning_windows(calib, n, window),
  )


def split_smollm2_tokens(prose, calib_text, eval_text, n_calib, n_eval, encode):
  """(calibration, evaluation, training) token ids of the SmolLM2 task.

  Default text: calibration from the start of the bundled prose, evaluation
  from its end (disjoint: `text.split_tokens`), training between. A user's
  text: calibration from the start of --calib-text, evaluation from the end
  of --eval-text; the same text for both must hold both without overlap
  (ValueError), so calibration and tuning never read evaluation tokens.
  """
  from models import text  # pylint: disable=g-import-not-at-top

  if calib_text is None and eval_text is None:
    calib, evals = text.split_tokens(prose, n_calib, n_eval)
  else:
    calib_ids = prose if calib_text is None else encode(calib_text)
    eval_ids = prose if eval_text is None else encode(eval_text)
    if calib_text == eval_text:  # one text: its start and its end
      calib, evals = text.split_tokens(
        calib_ids, min(n_calib, len(calib_ids)), n_eval
      )
    else:
      calib, evals = calib_ids[:n_calib], eval_ids[-n_eval:]
  train = prose[
    len(calib) if calib_text is None else 0 : len(prose)
    - (len(evals) if eval_text is None else 0)
  ]
  return calib, evals, train


def tuning_windows(calib, n_tokens: int, window: int = common.WINDOW):
  """Batches of `lqer eval --tune-tokens`: the first n_tokens calibration
  tokens, one window of `window` tokens per batch (the last one shorter)."""
  if not 0 < n_tokens <= len(calib):
    raise ValueError(
      f'--tune-tokens {n_tokens}: tuning reads calibration tokens only,'
      f' and there are {len(calib)}; give 1 to {len(calib)}'
    )
  tokens = np.asarray(calib[:n_tokens])
  return [(tokens[None, i : i + window],) for i in range(0, n_tokens, window)]


def minilm_task(
  calib_text=None,
  eval_text=None,
  n_calib=common.DEFAULT_CALIB_SENTENCES,
  n_eval=common.DEFAULT_EVAL_SENTENCES,
) -> Task:
  """MiniLM embedding fidelity on English sentences."""
  from models import minilm  # pylint: disable=g-import-not-at-top
  from models import text  # pylint: disable=g-import-not-at-top

  module, params, tokenizer = minilm.load_minilm()
  prose = text.sentences(text.num_sentences())
  first_eval = None  # default text: split_sentences keeps them disjoint
  if calib_text is None and eval_text is None:
    calib, evals = text.split_sentences(n_calib, n_eval)
  else:
    calib = list(text.text_sentences(calib_text or text.prose_text()))
    evals = list(text.text_sentences(eval_text or text.prose_text()))
    # One text for both: the sentences from `first_eval` on are evaluated.
    first_eval = (
      max(0, len(evals) - n_eval) if calib_text == eval_text else None
    )
    calib, evals = calib[:n_calib], evals[-n_eval:]
  train = prose[
    len(calib) if calib_text is None else 0 : len(prose)
    - (len(evals) if eval_text is None else 0)
  ]
  if len(evals) < 2:
    raise ValueError('evaluation text has fewer than 2 sentences')
  fp = minilm.encode(module, params, tokenizer, evals)

  def score(m, p):
    emb = minilm.encode(m, p, tokenizer, evals)
    cos = np.sum(emb * fp, axis=1)
    return {
      '1-cos': float(np.mean(1.0 - cos)),
      'nn_agree': float(np.mean(_nearest(emb) == _nearest(fp))),
    }

  batches = [
    minilm.tokenize(tokenizer, calib[i : i + 32])
    for i in range(0, len(calib), 32)
  ]

  def tune_batches(n):
    if not 0 < n <= len(calib):
      raise ValueError(
        f'--tune-tokens {n}: tuning reads calibration sentences only,'
        f' and there are {len(calib)}; give 1 to {len(calib)}'
      )
    if first_eval is not None and n > first_eval:
      raise ValueError(
        f'--tune-tokens {n}: the text holds {first_eval} sentences before'
        ' the evaluation sentences; tuning never reads evaluation text'
      )
    return [
      minilm.tokenize(tokenizer, calib[i : min(i + 16, n)])
      for i in range(0, n, 16)
    ]

  return Task(
    name='minilm',
    module=module,
    params=params,
    example=minilm.tokenize(tokenizer, ['a b']),
    calib_batches=batches,
    metric='1-cos',
    score=score,
    module_path=r'layer_\d+/.*',
    encode=lambda t: list(text.text_sentences(t)),
    train_data=train,
    tune_batches=tune_batches,
  )


def _nearest(emb):
  sim = emb @ emb.T
  np.fill_diagonal(sim, -np.inf)
  return np.argmax(sim, axis=1)


TASKS = {'smollm2': smollm2_task, 'minilm': minilm_task}


def calibration_statistics(task: Task, rules) -> Any:
  """Runs the float model under LqerCalibrationProvider over the batches."""
  cal = qwix.quantize_model(task.module, LqerCalibrationProvider(rules))
  return calibration.calibrate(
    cal, task.params, task.calib_batches, progress=True
  )


def gradient_statistics(task: Task, rules, stats):
  """stats with the output-gradient statistics of `task.gradient_batches`
  (`calibration.output_gradients`); prints their seconds."""
  start = time.perf_counter()
  grad_model = qwix.quantize_model(
    task.module, LqerCalibrationProvider(rules, output_gradients=True)
  )
  stats = calibration.output_gradients(
    grad_model,
    task.params,
    task.gradient_batches or task.calib_batches,
    stats,
    output=task.output,
    progress=True,
  )
  print(
    f'output-gradient statistics: {time.perf_counter() - start:.1f} s',
    file=sys.stderr,
  )
  return stats


def quantize(
  task: Task,
  rules,
  stats,
  base='rtn',
  compute_dtype=jnp.float32,
  budget_bits=None,
):
  """(LQER model, params, offline seconds) for the rules. The seconds are
  a cold pass, as in a fresh process: compile caches are cleared first, so
  a row does not reuse what an earlier row compiled."""
  model = qwix.quantize_model(
    task.module, LqerProvider(rules, compute_dtype=compute_dtype)
  )
  abstract = jax.eval_shape(model.init, jax.random.key(0), *task.example)[
    'params'
  ]
  jax.clear_caches()
  start = time.perf_counter()
  params = lqer_quantize_params(
    task.params,
    abstract,
    calibration=stats,
    base=base,
    budget_bits=budget_bits,
    progress=True,
  )
  jax.block_until_ready(params)
  return model, params, time.perf_counter() - start


def fingerprint(task_name, rules, base):
  return {'model': task_name, 'base': base, 'rules': repr(rules)}


def uniform_rank_for(params, num_weights, extra_bits) -> int:
  """The uniform rank whose factors spend `extra_bits` per weight on the
  weights of `params` that carry factors (nearest, at least 1)."""
  per_rank = (
    sum(
      component_bits(w.layout, w.rule)
      for w in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, WithLqer)
      )
      if isinstance(w, WithLqer)
    )
    / num_weights
  )
  return max(1, round(extra_bits / per_rank))


def subdir(root, bits, tile_size, method, rank, act_bits=None, rotate=False):
  """`lqer eval --save / --load`'s directory of one row's params."""
  act = '' if act_bits is None else f'a{act_bits}'
  rot = '_rot' if rotate else ''
  return f'{root}/w{bits}{act}_g{tile_size or 0}_{method}_r{rank}{rot}'
