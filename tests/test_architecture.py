"""The package's layers, as docs/architecture.md draws them.

Imports only run down the layers, only `lqer/_qwix.py` touches Qwix's
private modules and protected members, and the bundled models import
nothing of lqer.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A module may import its own layer and the ones below.
LAYERS = {
  '_qwix': 0,
  '_version': 0,
  'core': 1,
  'kernels': 1,
  'quant': 2,
  'offline': 3,
  'providers': 4,
  'lora': 5,
  'checkpoints': 6,
  'cli': 7,
}
TOP = 8  # lqer/__init__.py and __main__.py
QWIX_PROTECTED = ('_get_current_rule_and_op_id', '_rules')


def _layer(module: str) -> int:
  """Layer of a dotted lqer module name ('lqer' itself: the top)."""
  parts = module.split('.')
  if len(parts) == 1 or parts[1] in ('__init__', '__main__'):
    return TOP
  return LAYERS[parts[1]]


def _imports(tree):
  """(line, dotted name) of every import, nested ones included; `from a
  import b` yields 'a.b'."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        yield node.lineno, f'{node.module}.{alias.name}'


def _modules(folder):
  for path in sorted((ROOT / folder).rglob('*.py')):
    rel = path.relative_to(ROOT).with_suffix('')
    yield path, '.'.join(rel.parts), ast.parse(path.read_text())


def _lqer_target(name: str) -> str | None:
  """The lqer module an imported name lives in (None: not lqer's)."""
  parts = name.split('.')
  if parts[0] != 'lqer':
    return None
  if len(parts) > 1 and (parts[1] in LAYERS):
    return '.'.join(parts[:2])
  return 'lqer'  # a public name from lqer/__init__.py


def test_imports_run_down_the_layers():
  bad = []
  for path, module, tree in _modules('lqer'):
    own = _layer(module)
    for line, name in _imports(tree):
      target = _lqer_target(name)
      if target is not None and _layer(target) > own:
        bad.append(f'{path.relative_to(ROOT)}:{line} imports {name}')
  assert not bad, 'imports up the layers:\n' + '\n'.join(bad)


def test_only_qwix_shim_touches_qwix_internals():
  bad = []
  for path, module, tree in _modules('lqer'):
    if module == 'lqer._qwix':
      continue
    for line, name in _imports(tree):
      if name.startswith(('qwix._src', 'qwix.contrib')):
        bad.append(f'{path.relative_to(ROOT)}:{line} imports {name}')
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and node.attr in QWIX_PROTECTED:
        bad.append(f'{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}')
  assert not bad, 'only lqer/_qwix.py may touch Qwix internals:\n' + '\n'.join(
    bad
  )


def test_models_import_nothing_of_lqer():
  bad = [
    f'{path.relative_to(ROOT)}:{line} imports {name}'
    for path, _, tree in _modules('models')
    for line, name in _imports(tree)
    if name.split('.')[0] == 'lqer'
  ]
  assert not bad, '\n'.join(bad)


@pytest.mark.parametrize(
  'source, wrong',
  [
    ('from lqer.cli import tasks\n', 'lqer/quant/x.py'),
    ('from lqer import LqerRule\n', 'lqer/core/x.py'),
  ],
)
def test_the_check_sees_an_upward_import(source, wrong):
  """The checks above would fail on an upward import (guards the checker)."""
  module = wrong[:-3].replace('/', '.')
  targets = [_lqer_target(n) for _, n in _imports(ast.parse(source))]
  assert any(t and _layer(t) > _layer(module) for t in targets)
