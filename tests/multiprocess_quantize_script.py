"""One process of a multi-process `lqer quantize` on CPU, as README's
multi-host recipe runs it (tests/test_checkpoint_safety.py launches it):

    python tests/multiprocess_quantize_script.py SRC OUT PROCESSES ID PORT

Process ID of PROCESSES joins the coordinator on 127.0.0.1:PORT (process 0
serves it; CPU collectives over gloo), builds a ('data', 'model') mesh over
every process's device and runs the block-by-block pass on SRC into OUT:
each process reads only its devices' slices of the weights, process 0
gathers and writes each block. With PROCESSES 1 it runs the same pass on
one process with as many local devices as the others had in all (the
reference). Prints 'ok' when done.
"""

import os
import pathlib
import sys

SRC, OUT, PROCESSES, ID, PORT = sys.argv[1:6]
DEVICES = 2  # over all processes: a (1, 2) mesh
if int(PROCESSES) == 1:
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={DEVICES}'
sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

import jax  # pylint: disable=g-import-not-at-top

if int(PROCESSES) > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    f'127.0.0.1:{PORT}',
    num_processes=int(PROCESSES),
    process_id=int(ID),
    local_device_ids=list(range(DEVICES // int(PROCESSES))),
  )

from lqer.checkpoints import streaming  # pylint: disable=g-import-not-at-top
from models import hf_checkpoint  # pylint: disable=g-import-not-at-top
from tests import test_streaming as t  # pylint: disable=g-import-not-at-top


def main():
  assert jax.process_count() == int(PROCESSES), jax.process_count()
  assert jax.device_count() == DEVICES, jax.devices()
  mesh = jax.make_mesh(
    (1, DEVICES),
    ('data', 'model'),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  ckpt = hf_checkpoint.CheckpointDir(SRC)
  ids = t._calib_ids()  # pylint: disable=protected-access
  streaming.quantize_checkpoint(
    ckpt, OUT, t.SETTINGS, ids, mesh=mesh, progress=False
  )
  print(f'ok {jax.process_index()} reads {ckpt.reads}', flush=True)


if __name__ == '__main__':
  main()
