"""Small Linen and NNX MLPs used by the tests and examples."""

from flax import linen as nn
from flax import nnx
import jax


class SimpleMLP(nn.Module):
  """Dense -> gelu -> Dense, as in the earlier project's README."""

  dhidden: int = 64
  dout: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dhidden)(x)
    x = nn.gelu(x)
    return nn.Dense(self.dout)(x)


class NnxMLP(nnx.Module):
  """NNX twin of SimpleMLP: two nnx.Linear layers."""

  def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(din, dhidden, rngs=rngs)
    self.fc2 = nnx.Linear(dhidden, dout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x)))
