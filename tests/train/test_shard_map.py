"""The per-device train step under jax.jit(jax.shard_map(...)) equals it under jax.pmap.

Runs `shard_map_check.py` in a subprocess: the fake device count must be set before JAX
initialises.
"""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_shard_map_gives_the_pmap_update():
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
                      ).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, str(HERE / 'shard_map_check.py')], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'OK' in out.stdout, out.stdout
