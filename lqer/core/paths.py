"""Param paths as the strings lqer's errors, reports and files use."""


def path_str(path) -> str:
  """'layers_0/mlp/up/kernel' for a param path.

  Args:
    path: a tuple of names, or of JAX key entries (`DictKey`, as
      `jax.tree_util.tree_flatten_with_path` gives them).

  Returns:
    The names joined by '/'.
  """
  return '/'.join(str(getattr(k, 'key', k)) for k in path)
