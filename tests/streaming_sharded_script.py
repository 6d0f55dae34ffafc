"""Run by tests/test_streaming.py in a subprocess with 8 host devices: the
block-by-block pass over a (2, 4) mesh equals the single-device pass."""

import os
import pathlib
import sys
import tempfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

import jax  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from lqer.checkpoints import streaming  # pylint: disable=g-import-not-at-top
from models import hf_checkpoint  # pylint: disable=g-import-not-at-top
from tests import test_streaming as t  # pylint: disable=g-import-not-at-top


def main():
  assert len(jax.devices()) == 8
  mesh = jax.make_mesh(
    (2, 4), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  tmp = pathlib.Path(tempfile.mkdtemp())
  t.write_tiny(tmp / 'src', t.tiny_config(num_layers=2))
  ids = t._calib_ids()  # pylint: disable=protected-access
  streaming.quantize_checkpoint(
    tmp / 'src', tmp / 'single', t.SETTINGS, ids, progress=False
  )
  ckpt = hf_checkpoint.CheckpointDir(tmp / 'src')
  streaming.quantize_checkpoint(
    ckpt, tmp / 'mesh', t.SETTINGS, ids, mesh=mesh, progress=False
  )
  # A kernel split 4 ways over 'model' is read as 4 slices of a quarter each
  # (each host of a multi-host mesh reads only its devices' slices).
  ckpt.reads = ckpt.read_elements = 0
  down = 'model.layers.0.mlp.down_proj.weight'
  ckpt.read(down, jax.sharding.NamedSharding(mesh, P('model', None)))
  assert (ckpt.reads, ckpt.read_elements) == (4, 64 * 128), (
    ckpt.reads,
    ckpt.read_elements,
  )
  model, single, _ = streaming.load_quantized(tmp / 'single')
  _, sharded, _ = streaming.load_quantized(tmp / 'mesh', mesh=mesh)
  down = sharded['layers_1']['mlp']['down_proj']['kernel']
  assert down.array.qvalue.sharding.spec == P('model', None), (
    down.array.qvalue.sharding
  )
  assert down.b.sharding.spec == P(), down.b.sharding
  up = sharded['layers_1']['mlp']['up_proj']['kernel']
  assert up.array.qvalue.sharding.spec == P(None, 'model')
  for i in range(2):
    for group, name in [
      ('attn', 'k_proj'),
      ('attn', 'o_proj'),
      ('mlp', 'down_proj'),
    ]:
      got, want = (
        p[f'layers_{i}'][group][name]['kernel'] for p in (sharded, single)
      )
      np.testing.assert_array_equal(got.array.qvalue, want.array.qvalue)
      np.testing.assert_array_equal(got.array.scale, want.array.scale)
      ab = t._factor_product(want)  # pylint: disable=protected-access
      np.testing.assert_allclose(
        t._factor_product(got),
        ab,  # pylint: disable=protected-access
        atol=0.02 * np.abs(ab).max(),
      )
  x = t._calib_ids(2, 16, seed=1)  # pylint: disable=protected-access
  apply = jax.jit(model.apply)
  want = np.asarray(apply({'params': single}, x))
  got = np.asarray(apply({'params': sharded}, x))
  np.testing.assert_allclose(got, want, atol=0.01 * np.abs(want).max())
  print('ok')


if __name__ == '__main__':
  main()
