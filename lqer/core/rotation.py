"""Randomized block Hadamard rotations, applied by a fast Walsh-Hadamard
transform (O(n log b) per n-wide vector, b the block size; radix-8 stages,
`RADIX`).

The rotation of an n-wide input is the orthogonal

    H = diag(s) (I_{n/b} ⊗ H_b / sqrt(b)),    H Hᵀ = I,

s in {-1, +1}^n random signs, H_b the Sylvester Hadamard matrix of size b
(a power of two; `scipy.linalg.hadamard(b)`, symmetric). A weight W (in,
out) multiplied as x W is stored rotated, Hᵀ W, and its input rotated
online, x H, so (x H)(Hᵀ W) = x W: the rotation spreads an outlier channel
of x over its block, which 4-bit activation quantization needs (QuaRot).

Vectors are rows: `rotate(v, signs)` is v H and `rotate_transpose` v Hᵀ,
along any axis. On a matrix's first axis, `rotate` gives Hᵀ W (each column
w as the row wᵀ: wᵀ H = (Hᵀ w)ᵀ). The signs are stored as (n / b, b), so
their shape records the block size. Computed in float32 (float64 stays),
returned in the input's dtype; jittable and vmappable.
"""

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('hadamard',)


def default_block(size: int) -> int:
  """The largest power of two dividing `size` (576 = 9 x 64 -> 64)."""
  if size < 1:
    raise ValueError(f'a rotation needs a positive size, got {size}')
  return size & -size


def valid_blocks(size: int) -> list[int]:
  """The block sizes a `size`-wide rotation may use: powers of two >= 2
  dividing it."""
  return [1 << i for i in range(1, default_block(size).bit_length())]


def random_signs(seed: int, size: int, block: int) -> np.ndarray:
  """(size // block, block) int8 signs in {-1, +1}, a function of (seed,
  size) only: the low bits of NumPy's PCG64 raw stream, a bit stream NumPy
  keeps fixed across versions. Computed on the host, so a traced model
  sees constants."""
  if block < 1 or block & (block - 1) or size % block:
    raise ValueError(
      f'rotation block {block} must be a power of two dividing {size};'
      f' valid: {valid_blocks(size)}'
    )
  seq = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(size)])
  bits = np.random.PCG64(seq).random_raw(size) & 1
  return (1 - 2 * bits.astype(np.int8)).reshape(size // block, block)


def _compute(x):
  """x in float32 (float64 stays), and its dtype to return in."""
  x = jnp.asarray(x)
  if x.dtype == jnp.float64:
    return x, x.dtype
  return x.astype(jnp.float32), x.dtype


def _last(fn, x, axis):
  """fn applied along `axis` (fn works on the last axis)."""
  x = jnp.moveaxis(x, axis, -1)
  return jnp.moveaxis(fn(x), -1, axis)


# Points per stage of the transform: H_b = H_8 ⊗ ... ⊗ H_8 (⊗ H_2 or H_4),
# each factor one small exact matmul along its own axis of x reshaped
# (..., 8, ..., 8): log_8(b) passes over x instead of log_2(b) two-point
# butterflies, 1.6-1.9x faster on XLA:CPU (2048 tokens; b = 64, 512,
# 4096), the same O(b log b) per vector.
RADIX = 8


def _butterflies(x):
  """x (..., b) @ H_b, unnormalised: the Sylvester H_b = H_2^{⊗m} applied
  as stages of `RADIX`-point Walsh-Hadamard transforms (entries ±1, so the
  products are exact; HIGHEST precision: no TF32 rounding of x)."""
  b = x.shape[-1]
  lead = x.shape[:-1]
  sizes, left = [], b
  while left > 1:
    sizes.append(min(RADIX, left))
    left //= sizes[-1]
  y = x.reshape(*lead, *sizes)
  for i, k in enumerate(sizes):
    axis = len(lead) + i
    y = jnp.tensordot(
      y,
      jnp.asarray(_sylvester(k), x.dtype),
      axes=([axis], [0]),
      precision=jax.lax.Precision.HIGHEST,
    )
    y = jnp.moveaxis(y, -1, axis)
  return y.reshape(x.shape)


def _sylvester(k: int) -> np.ndarray:
  """The Sylvester Hadamard matrix H_k (k a power of two), float32."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < k:
    h = np.block([[h, h], [h, -h]])
  return h


def fwht(x: jax.Array, axis: int = -1) -> jax.Array:
  """The orthonormal fast Walsh-Hadamard transform along `axis` (a power
  of two b wide): v -> v H_b / sqrt(b), O(b log b) per vector."""
  b = x.shape[axis]
  if b < 1 or b & (b - 1):
    raise ValueError(f'fwht needs a power-of-two axis, got size {b}')
  x, dtype = _compute(x)
  out = _last(_butterflies, x, axis) * (1.0 / np.sqrt(b))
  return out.astype(dtype)


def block_hadamard(x: jax.Array, block: int, axis: int = -1) -> jax.Array:
  """v -> v (I ⊗ H_b / sqrt(b)) along `axis`: `fwht` of each consecutive
  `block`-wide slice (symmetric, so its own transpose and inverse)."""
  size = x.shape[axis]
  if block < 1 or block & (block - 1) or size % block:
    raise ValueError(
      f'rotation block {block} must be a power of two dividing {size};'
      f' valid: {valid_blocks(size)}'
    )
  x, dtype = _compute(x)

  def one(v):
    lead = v.shape[:-1]
    out = _butterflies(v.reshape(*lead, size // block, block))
    return out.reshape(*lead, size) * (1.0 / np.sqrt(block))

  return _last(one, x, axis).astype(dtype)


def _flat_signs(signs, dtype):
  return jnp.asarray(signs).reshape(-1).astype(dtype)


def _check(x, signs, axis):
  size = int(np.prod(np.shape(signs)))
  if np.ndim(signs) != 2 or x.shape[axis] != size:
    raise ValueError(
      f'rotation signs of shape {np.shape(signs)} (blocks, block) do not'
      f' fit an axis of size {x.shape[axis]}'
    )
  return np.shape(signs)[1]


def rotate(x: jax.Array, signs, axis: int = -1) -> jax.Array:
  """v -> v H = (v ⊙ s) (I ⊗ H_b / sqrt(b)) along `axis` (signs
  (n / b, b)). On a weight's contracting axis: Hᵀ W."""
  block = _check(x, signs, axis)
  x, dtype = _compute(x)
  s = _last(lambda v: v * _flat_signs(signs, v.dtype), x, axis)
  return block_hadamard(s, block, axis).astype(dtype)


def rotate_transpose(x: jax.Array, signs, axis: int = -1) -> jax.Array:
  """v -> v Hᵀ = (v (I ⊗ H_b / sqrt(b))) ⊙ s along `axis`, the inverse of
  `rotate`. On a weight's contracting axis: H W."""
  block = _check(x, signs, axis)
  x, dtype = _compute(x)
  y = block_hadamard(x, block, axis)
  return _last(lambda v: v * _flat_signs(signs, v.dtype), y, axis).astype(dtype)


@jax.jit
def rotate_gram(r: jax.Array, signs) -> jax.Array:
  """Hᵀ R H of an (n, n) R (e.g. E[xᵀx]): the second moment of x H."""
  return rotate(rotate(r, signs, -1), signs, -2)


def matrix(signs) -> jax.Array:
  """The explicit H (n, n) float32, for checks: `rotate` of the identity."""
  n = int(np.prod(np.shape(signs)))
  return rotate(jnp.eye(n, dtype=jnp.float32), signs, -1)
