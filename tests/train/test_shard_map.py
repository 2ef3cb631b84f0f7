"""The per-device train step under jax.jit(jax.shard_map(...)) equals it under jax.pmap.

Runs `shard_map_check.py` in a subprocess: the fake device count must be set before JAX
initialises.
"""

import helpers


def test_shard_map_gives_the_pmap_update():
  helpers.run_on_fake_devices('shard_map_check.py')
