"""`WithLqer`: a Qwix PTQ weight that also carries the low-rank factors."""

from typing import Any

import flax
from flax import nnx
import jax
from qwix._src.core import qarray
from qwix._src.providers import ptq

from lqer import layout as layout_lib


@flax.struct.dataclass(kw_only=True)
class WithLqer(ptq.WithAux[qarray.QArray]):
  """W ~= deq(array) [/ awq_scale] + A B, in the kernel's own axes.

  Attributes:
    a: (*batch, *contracting, k) left factor, `LqerRule.factor_dtype`.
    b: (*batch, k, *output) right factor.
    awq_scale: per-input-channel AWQ scale s of an AWQ base (the base weight
      is deq(array) / s along the contracting axis), or None.
    contracting_axes: kernel axes summed with the input.
    batch_axes: kernel axes shared with input and output (einsum batch).
    rule: the `LqerRule` that produced it (rank, method, qtype, ...).
  """

  a: jax.Array
  b: jax.Array
  awq_scale: jax.Array | None = None
  contracting_axes: tuple[int, ...] = flax.struct.field(pytree_node=False)
  batch_axes: tuple[int, ...] = flax.struct.field(
      pytree_node=False, default=()
  )
  rule: Any = flax.struct.field(pytree_node=False, default=None)

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def layout(self) -> layout_lib.KernelLayout:
    return layout_lib.KernelLayout(
        tuple(self.shape), self.contracting_axes, self.batch_axes
    )


nnx.register_data_type(WithLqer)


def layout_of(weight: ptq.WithAux) -> layout_lib.KernelLayout:
  """The kernel layout of a quantized weight: a `WithLqer` carries its own;
  for a plain Qwix `WithAux` every non-channelwise axis contracts (Qwix marks
  all non-contracting axes channelwise; einsum batch axes cannot be told
  apart there)."""
  if isinstance(weight, WithLqer):
    return weight.layout
  return layout_lib.KernelLayout.from_channelwise_axes(
      tuple(weight.array.shape), weight.how.channelwise_axes)
