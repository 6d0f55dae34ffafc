"""Every Python example in README.md and docs/*.md runs as written.

One namespace per page, its ```py / ```python blocks in order; checks run
right after the block that first defines the name they read.
"""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [
  'README.md',
  *sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'docs').glob('*.md')),
]
BLOCK = re.compile(r'^```(?:py|python)\n(.*?)^```', re.S | re.M)


def _close(a, b):
  np.testing.assert_allclose(
    np.asarray(a),
    np.asarray(b),
    rtol=1e-5,
    atol=1e-5 * float(np.abs(np.asarray(b)).max()),
  )


# page -> {name: check(namespace)}
CHECKS = {
  'README.md': {
    'y': lambda ns: ns['y'].shape == (2, 16, 32) or _fail(ns['y'].shape),
    'y_nnx': lambda ns: (
      ns['y_nnx'].shape == (2, 16, 32) or _fail(ns['y_nnx'].shape)
    ),
  },
  'docs/guide.md': {
    # Packing keeps the numbers: the packed model gives the unpacked
    # model's output (float32 rounding).
    'y_fast': lambda ns: _close(ns['y_fast'], ns['y']),
    'output': lambda ns: (
      ns['output'].shape == (1, 10) or _fail(ns['output'].shape)
    ),
  },
  'docs/qlora.md': {
    'y_served': lambda ns: (
      np.isfinite(np.asarray(ns['y_served'])).all() or _fail('non-finite')
    ),
  },
}


def _fail(what):
  raise AssertionError(what)


def test_every_page_is_listed_and_has_examples_or_none():
  assert 'docs/guide.md' in PAGES and 'docs/architecture.md' in PAGES
  assert len(BLOCK.findall((ROOT / 'README.md').read_text())) >= 2


@pytest.mark.parametrize('page', PAGES)
def test_page_examples_run(page):
  blocks = BLOCK.findall((ROOT / page).read_text())
  checks = dict(CHECKS.get(page, {}))
  namespace = {}
  for block in blocks:
    exec(compile(block, str(ROOT / page), 'exec'), namespace)  # pylint: disable=exec-used
    for name in [n for n in checks if n in namespace]:
      checks.pop(name)(namespace)
  assert not checks, f'{page}: examples never defined {sorted(checks)}'
