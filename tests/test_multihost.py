"""docs/checkpoints.md's multi-host recipe, run for real (issue 29): `lqer
quantize --distributed` as two local CPU processes (coordinator on
127.0.0.1, gloo collectives, a (1, 2) mesh over their devices), each
reading only its own slices of the weights. Its output equals one process's
on the same mesh, and a run that loses one process mid-way resumes, on a
rerun of the same commands, to that same output."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from lqer.checkpoints import streaming
from tests.test_checkpoint_safety import LQER_NAME
from tests.test_checkpoint_safety import _assert_same_output
from tests.test_streaming import tiny_config
from tests.test_streaming import write_tiny

ROOT = pathlib.Path(__file__).parents[1]
SETTINGS = ['--rank', '4', '--tile-size', '32', '--calib-tokens', '512']
LAYERS = 2
TIMEOUT = 300  # seconds any one run may take before the test fails


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _lqer_quantize(src, out, *, port=None, process_id=0, json_file=None):
  """Starts `lqer quantize` as README's recipe runs it: one of two
  processes under --distributed (with `port`), else one process with two
  devices and --mesh 1,2 (the reference)."""
  env = dict(os.environ)
  argv = [sys.executable, '-m', 'lqer', 'quantize', str(src)]
  argv += ['--out', str(out), *SETTINGS]
  if port is None:
    env['XLA_FLAGS'] = (
      env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
    )
    argv += ['--mesh', '1,2']
  else:
    argv += ['--distributed', '--coordinator', f'127.0.0.1:{port}']
    argv += ['--num-processes', '2', '--process-id', str(process_id)]
  if json_file is not None:
    argv += ['--json', str(json_file)]
  return subprocess.Popen(
    argv,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
    env=env,
  )


def _finish(procs) -> list[str]:
  """Each process's stdout once all exit 0; none is left running."""
  try:
    results = [p.communicate(timeout=TIMEOUT) for p in procs]
  finally:
    _kill(procs)
  for p, (_, stderr) in zip(procs, results):
    assert p.returncode == 0, stderr[-3000:]
  return [stdout for stdout, _ in results]


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def _weights_read(stdout) -> int:
  return int(re.search(r'tensor slices \((\d+) weights\)', stdout).group(1))


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """A 2-block source and one process's output on a (1, 2) mesh."""
  root = tmp_path_factory.mktemp('multihost')
  write_tiny(root / 'src', tiny_config(num_layers=LAYERS))
  (one,) = _finish([_lqer_quantize(root / 'src', root / 'one')])
  return root, _weights_read(one)


def test_two_processes_write_what_one_process_writes(world, tmp_path):
  root, one_read = world
  port = _free_port()
  stdouts = _finish(
    [
      _lqer_quantize(root / 'src', tmp_path, port=port, process_id=i)
      for i in (0, 1)
    ]
  )
  _assert_same_output(tmp_path, root / 'one')
  # Each process read its own half of every split kernel: less than the one
  # process read for both of its devices.
  reads = [_weights_read(s) for s in stdouts]
  assert reads[0] == reads[1] < one_read, (reads, one_read)
  assert 'process 0 of 2: wrote' in stdouts[0]


def test_losing_a_process_mid_run_then_rerunning_resumes_to_the_same_output(
  world, tmp_path
):
  root, _ = world
  out = tmp_path / 'out'
  port = _free_port()
  procs = [
    _lqer_quantize(root / 'src', out, port=port, process_id=i) for i in (0, 1)
  ]
  try:
    deadline = time.time() + TIMEOUT
    while not (out / streaming.block_file(0)).exists():
      for p in procs:
        assert p.poll() is None, p.communicate()[1][-3000:]
      assert time.time() < deadline
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # a host lost
    # The survivor cannot finish the block alone: JAX's coordination
    # service aborts it after its heartbeat timeout (100 s); a scheduler
    # restarting the job would not wait for that.
    time.sleep(2)
  finally:
    _kill(procs)
  assert procs[0].returncode != 0
  done = sorted(p.name for p in out.glob('block_*.safetensors'))
  assert done and len(done) < LAYERS, done
  assert all(LQER_NAME.fullmatch(p.name) for p in out.iterdir())

  port = _free_port()
  json_files = [tmp_path / f'{i}.json' for i in (0, 1)]
  _finish(
    [
      _lqer_quantize(root / 'src', out, port=port, process_id=i, json_file=j)
      for i, j in zip((0, 1), json_files)
    ]
  )
  _assert_same_output(out, root / 'one')
  # The rerun resumed: the blocks the first run wrote were not quantized
  # again, the others were.
  records = json.loads(json_files[0].read_text())
  assert [('quantize_s' in r) for r in records] == [
    i >= len(done) for i in range(LAYERS)
  ], records


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--mesh', '2'], r"--mesh '2': give DATA,MODEL"),
    (['--mesh', '0,1'], r'both sizes must be at least 1'),
    (['--mesh', '1,3'], r'--mesh 1,3: 3 devices, but there are 1'),
    (['--coordinator', 'h:1'], r'need --distributed'),
    (['--distributed', '--num-processes', '2'], r'give all of --coordinator'),
    (
      ['--distributed', '--coordinator', 'h:1', '--num-processes', '2']
      + ['--process-id', '2'],
      r'--process-id 2 must lie in \[0, --num-processes 2\)',
    ),
  ],
)
def test_mesh_and_cluster_flags_are_checked_before_any_weight_is_read(
  tmp_path, flags, message
):
  from lqer.cli import main as cli  # pylint: disable=g-import-not-at-top

  argv = ['quantize', str(tmp_path / 'absent'), '--out', str(tmp_path / 'q')]
  with pytest.raises(SystemExit, match=message):
    cli.main(argv + flags)
  assert not (tmp_path / 'q').exists()
