"""The README's Python examples run as written, in order."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_python_examples_run():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  assert len(blocks) >= 3
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['output'].shape == (1, 10)
  assert namespace['y'].shape == (2, 16, 32)
