"""The one place that decides how a kernel becomes the matrix it multiplies.

A kernel of any rank has batch axes (shared with the input and the output,
e.g. the head axis of an einsum 'bnh,nhd->bnd'), contracting axes (summed with
the input) and output axes. Its matrix form is (*batch, in, out) with
in = prod(contracting sizes) and out = prod(output sizes), axes kept in the
kernel's own order. The factors are stored unflattened,
A: (*batch, *contracting, k) and B: (*batch, k, *output), so that inference
contracts them against the input with the same axis pairing as the kernel.
"""

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """Axis roles of one kernel: shape, contracting axes and batch axes."""

  shape: tuple[int, ...]
  contracting_axes: tuple[int, ...]
  batch_axes: tuple[int, ...] = ()

  def __post_init__(self):
    axes = set(self.contracting_axes) | set(self.batch_axes)
    if not self.contracting_axes or not axes <= set(range(len(self.shape))):
      raise ValueError(
        f'invalid kernel layout: shape {self.shape}, contracting axes'
        f' {self.contracting_axes}, batch axes {self.batch_axes}'
      )
    if not self.output_axes:
      raise ValueError(f'kernel of shape {self.shape} has no output axis')

  @classmethod
  def from_channelwise_axes(cls, shape: Sequence[int], channelwise_axes):
    """Layout of a Qwix PTQ weight: every non-channelwise axis contracts.

    Qwix's HowToQuantize marks all non-contracting axes of a weight as
    channelwise, so this is exact for Dense, DenseGeneral and einsums without
    batch axes (which need the op's dimension numbers to be told apart).
    """
    shape = tuple(shape)
    contracting = tuple(
      a for a in range(len(shape)) if a not in set(channelwise_axes)
    )
    return cls(shape, contracting)

  @property
  def output_axes(self) -> tuple[int, ...]:
    used = set(self.contracting_axes) | set(self.batch_axes)
    return tuple(a for a in range(len(self.shape)) if a not in used)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def contracting_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.contracting_axes)

  @property
  def output_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.output_axes)

  @property
  def in_size(self) -> int:
    return math.prod(self.contracting_shape)

  @property
  def out_size(self) -> int:
    return math.prod(self.output_shape)

  @property
  def max_rank(self) -> int:
    return min(self.in_size, self.out_size)

  def check_rank(self, rank: int, name: str):
    """Raises ValueError naming the weight if rank exceeds min(in, out)."""
    if rank > self.max_rank:
      raise ValueError(
        f'{name}: rank {rank} is larger than the matrix allows: the kernel'
        f' {self.shape} multiplies as {self.in_size} x {self.out_size}, so'
        f' rank must be <= {self.max_rank}'
      )

  def to_matrix(self, w: jax.Array) -> jax.Array:
    """Kernel -> (*batch, in, out)."""
    perm = self.batch_axes + self.contracting_axes + self.output_axes
    return jnp.transpose(w, perm).reshape(
      *self.batch_shape, self.in_size, self.out_size
    )

  def from_matrix(self, m: jax.Array) -> jax.Array:
    """(*batch, in, out) -> kernel, the inverse of `to_matrix`."""
    perm = self.batch_axes + self.contracting_axes + self.output_axes
    m = m.reshape(
      *self.batch_shape, *self.contracting_shape, *self.output_shape
    )
    return jnp.transpose(m, tuple(perm.index(a) for a in range(len(perm))))

  def a_shape(self, rank: int) -> tuple[int, ...]:
    return (*self.batch_shape, *self.contracting_shape, rank)

  def b_shape(self, rank: int) -> tuple[int, ...]:
    return (*self.batch_shape, rank, *self.output_shape)

  def a_scale_shape(self, rank: int) -> tuple[int, ...]:
    """One scale per column of A, broadcasting against a_shape."""
    return (*self.batch_shape, *[1] * len(self.contracting_axes), rank)

  def b_scale_shape(self, rank: int) -> tuple[int, ...]:
    """One scale per row of B, broadcasting against b_shape."""
    return (*self.batch_shape, rank, *[1] * len(self.output_axes))

  def split_factors(self, a: jax.Array, b: jax.Array):
    """(*batch, in, k), (*batch, k, out) -> the stored A and B shapes."""
    rank = a.shape[-1]
    return a.reshape(self.a_shape(rank)), b.reshape(self.b_shape(rank))

  def split_scales(self, a_scale: jax.Array, b_scale: jax.Array):
    """(*batch, 1, k), (*batch, k, 1) -> the stored scale shapes."""
    rank = a_scale.shape[-1]
    return (
      a_scale.reshape(self.a_scale_shape(rank)),
      b_scale.reshape(self.b_scale_shape(rank)),
    )

  def merge_factors(self, a: jax.Array, b: jax.Array):
    """Stored A and B -> (*batch, in, k), (*batch, k, out)."""
    rank = a.shape[-1]
    nb = len(self.batch_axes)
    return (
      a.reshape(*a.shape[:nb], self.in_size, rank),
      b.reshape(*b.shape[:nb], rank, self.out_size),
    )

  def branch_dimension_numbers(self, lhs_ndim, dimension_numbers):
    """Dimension numbers of x A and of (x A) B, given those of x W.

    The op contracts lhs axis lhs_ca[i] with kernel axis rhs_ca[i] and
    batches lhs_ba[j] with rhs_ba[j]. Both results keep dot_general's output
    order, (batch, lhs free, k) and then (batch, lhs free, output), which is
    the order of the main product x W.
    """
    (lhs_ca, rhs_ca), (lhs_ba, rhs_ba) = dimension_numbers
    if sorted(rhs_ca) != list(self.contracting_axes) or sorted(rhs_ba) != list(
      self.batch_axes
    ):
      raise ValueError(
        f'the op contracts kernel axes {tuple(rhs_ca)} with batch axes'
        f' {tuple(rhs_ba)}, but the factors were built for contracting'
        f' axes {self.contracting_axes} and batch axes {self.batch_axes}'
      )
    nb = len(self.batch_axes)
    a_axis = {ax: i for i, ax in enumerate(self.batch_axes)}
    a_axis |= {ax: nb + i for i, ax in enumerate(self.contracting_axes)}
    first = (
      (tuple(lhs_ca), tuple(a_axis[ax] for ax in rhs_ca)),
      (tuple(lhs_ba), tuple(a_axis[ax] for ax in rhs_ba)),
    )
    xa_ndim = lhs_ndim - len(lhs_ca) + 1
    second = (
      ((xa_ndim - 1,), (nb,)),
      (tuple(range(len(rhs_ba))), tuple(a_axis[ax] for ax in rhs_ba)),
    )
    return first, second
