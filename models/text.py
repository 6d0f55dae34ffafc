"""Offline English text for calibration and evaluation.

The corpus is CPython's ``pydoc_data.topics.topics``: the language-reference
topics that ``help()`` shows (English prose interleaved with grammar rules and
code examples). It ships with every Python, needs no download, and is fixed
for a given Python version (its exact content can change between releases).

Calibration data is always taken from the *start* of the corpus and
evaluation data from its *end*, so the two never overlap as long as their
sizes fit, and each set does not depend on the size of the other.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from pydoc_data import topics as _topics
import re
from typing import Sequence

import numpy as np

MIN_WORDS = 6
MAX_WORDS = 40

_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z])')
_BULLET = re.compile(r'^\s*(?:\*|-|\d+\.)\s+')


def prose_text() -> str:
  """Returns all pydoc topics, concatenated in sorted key order."""
  topics = _topics.topics
  return '\n\n'.join(topics[key] for key in sorted(topics))


def read_text_file(path: str | os.PathLike) -> str:
  """Reads a user-provided UTF-8 text file."""
  with open(path, encoding='utf-8') as f:
    return f.read()


def split_tokens(
  token_ids: Sequence[int] | np.ndarray, n_calib: int, n_eval: int
) -> tuple[np.ndarray, np.ndarray]:
  """Splits a token stream into disjoint calibration and evaluation ranges.

  Args:
    token_ids: the tokenized corpus, e.g. of :func:`prose_text`.
    n_calib: number of calibration tokens, taken from the start.
    n_eval: number of evaluation tokens, taken from the end.

  Returns:
    ``(calib, eval)``: ``token_ids[:n_calib]`` and ``token_ids[-n_eval:]``.

  Raises:
    ValueError: if the two ranges would overlap.
  """
  token_ids = np.asarray(token_ids)
  if n_calib < 0 or n_eval < 0 or n_calib + n_eval > len(token_ids):
    raise ValueError(
      f'cannot take {n_calib} calibration + {n_eval} evaluation tokens '
      f'from {len(token_ids)} without overlap'
    )
  return token_ids[:n_calib], token_ids[len(token_ids) - n_eval :]


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _paragraph_sentences(paragraph: str) -> list[str]:
  """Splits one paragraph into candidate sentences.

  A leading definition-list term (an unindented, non-bullet line followed by
  indented lines, e.g. ``"Sets"`` before its description) is dropped.
  """
  lines = paragraph.splitlines()
  if (
    len(lines) > 1
    and not _BULLET.match(lines[0])
    and _indent(lines[1]) > _indent(lines[0])
  ):
    lines = lines[1:]
  lines = [_BULLET.sub('', line).strip() for line in lines]
  text = ' '.join(' '.join(lines).split())  # Collapse runs of whitespace.
  return _SENTENCE_END.split(text)


def _is_prose_sentence(sentence: str) -> bool:
  """Keeps capitalised, terminated sentences of ``MIN_WORDS..MAX_WORDS``
  words."""
  n_words = len(sentence.split())
  return (
    MIN_WORDS <= n_words <= MAX_WORDS
    and sentence[0].isupper()
    and sentence[-1] in '.!?'
    and '::=' not in sentence
    and '>>>' not in sentence
  )


@functools.cache
def _all_sentences() -> tuple[str, ...]:
  """All distinct prose sentences of the bundled prose."""
  return text_sentences(prose_text())


def text_sentences(text: str) -> tuple[str, ...]:
  """Distinct prose sentences of any text, in order of first appearance."""
  found = {}
  for paragraph in re.split(r'\n\s*\n', text):
    if paragraph.startswith((' ', '\t')):  # Indented: code or grammar.
      continue
    for sentence in _paragraph_sentences(paragraph):
      if _is_prose_sentence(sentence):
        found.setdefault(sentence, None)
  return tuple(found)


def num_sentences() -> int:
  """Number of sentences available to :func:`sentences`."""
  return len(_all_sentences())


def sentences(n: int, offset: int = 0) -> list[str]:
  """Returns ``n`` English sentences starting at index ``offset``.

  Sentences come from :func:`prose_text`, split on sentence ends, keep
  6-40 words, are deduplicated and listed in order of first appearance.

  Raises:
    ValueError: if fewer than ``offset + n`` sentences exist.
  """
  pool = _all_sentences()
  if n < 0 or offset < 0 or offset + n > len(pool):
    raise ValueError(
      f'requested sentences [{offset}, {offset + n}) but only {len(pool)} exist'
    )
  return list(pool[offset : offset + n])


def split_sentences(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
  """Disjoint calibration (first ``n_calib``) and evaluation (last ``n_eval``)
  sentences."""
  total = num_sentences()
  if n_calib + n_eval > total:
    raise ValueError(
      f'cannot take {n_calib} + {n_eval} sentences out of {total}'
    )
  return sentences(n_calib), sentences(n_eval, offset=total - n_eval)


# Standard-library modules whose docstrings make the "other text" of README's
# runs: library documentation, not the language reference of prose_text().
DOCSTRING_MODULES = (
  'argparse',
  'asyncio',
  'collections',
  'concurrent.futures',
  'contextlib',
  'dataclasses',
  'decimal',
  'difflib',
  'email',
  'fractions',
  'functools',
  'heapq',
  'http.server',
  'inspect',
  'itertools',
  'json',
  'logging',
  'multiprocessing',
  'pathlib',
  'pickle',
  're',
  'shutil',
  'socket',
  'sqlite3',
  'statistics',
  'subprocess',
  'tarfile',
  'threading',
  'typing',
  'unittest',
  'urllib.request',
  'xml.etree.ElementTree',
  'zipfile',
)


def docstring_text() -> str:
  """The public docstrings of `DOCSTRING_MODULES`, in order (another
  English text that ships with Python; `python -m models.text`)."""
  docs = []
  for name in DOCSTRING_MODULES:
    for attr, obj in vars(importlib.import_module(name)).items():
      doc = None if attr.startswith('_') else inspect.getdoc(obj)
      if doc:
        docs.append(doc)
  return '\n\n'.join(docs)


if __name__ == '__main__':
  print(docstring_text())
