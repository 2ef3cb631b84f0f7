"""What a resumed run may change: the command's config against the one its checkpoints recorded.

A checkpoint records the config it was made with (``meta`` item, `maskrcnn_jax.train.checkpoint`)
and the device layout it ran on. Rerunning a command resumes from the latest checkpoint and, with
the data position restored from the step, ends with the parameters an uninterrupted run would
have had, but only if nothing that shapes the state or the data order changed. So before a
resumed run writes anything, `check_resume` compares the two configs key by key:

* keys in `SAFE_KEYS` (evaluation, logging, checkpoint cadence, more total steps, where the
  dataset lives, inference-only model settings, initialisation, which only matters at step 0)
  may change; each change is logged;
* any other change (the model, batch size, learning rate schedule, seed, the dataset, data
  options) and a different number of devices or processes stops the run with
  `ResumeConfigError`, one line per key (old -> new);
* ``--config.train.allow_config_changes=True`` accepts such changes knowingly (each is logged as a
  warning); the new config is then recorded for the checkpoints that follow.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from maskrcnn_jax import configs

# Keys (or key prefixes ending with '.') a resumed run may change.
SAFE_KEYS = (
    'mode', 'eval.', 'benchmark.', 'init.',
    'train.total_steps', 'train.log_every_steps', 'train.checkpoint_every_steps',
    'train.max_checkpoints_to_keep', 'train.allow_config_changes',
    'data.tfds_data_dir', 'data.num_workers', 'data.prefetch_batches', 'data.eval_split',
    'model.test.', 'model.rpn.test_', 'model.inference_products',
    # The same numbers computed another way (equal gradients, tested): speed choices.
    'model.conv_kernel_grad', 'model.mask.train_slots',
)


class ResumeConfigError(configs.ConfigError):
  """The command's config changes what the checkpoints of its workdir were made with."""


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'model.backbone.depth': 50, ...} with JSON values (tuples as lists), comparable with a
  recorded config."""
  return {k: json.loads(json.dumps(v, default=str)) for k, v in configs.flatten(tree).items()}


def is_safe(key: str) -> bool:
  return any(key == k or (k.endswith(('.', '_')) and key.startswith(k)) for k in SAFE_KEYS)


def layout(num_devices: int, num_processes: int) -> dict[str, int]:
  """The device layout a checkpoint records (the data order depends on it)."""
  return {'num_devices': int(num_devices), 'num_processes': int(num_processes)}


def check_resume(config, recorded: Mapping[str, Any], recorded_layout: Mapping[str, int] | None,
                 current_layout: Mapping[str, int], source: str) -> list[str]:
  """Compares `config` with the `recorded` one (a dict, e.g. a checkpoint's meta['config']).

  Returns the changed keys (logged). Raises ResumeConfigError listing each unsafe change when
  config.train.allow_config_changes is False. `source` names where `recorded` came from.
  """
  old, new = flatten(recorded), flatten(config.to_dict())
  changes = []
  for key in sorted(set(old) | set(new)):
    if key not in old:
      continue  # a key this version added: the recorded run ran with its default
    if old[key] != new.get(key, old[key]):
      changes.append((key, old[key], new.get(key)))
  if recorded_layout:
    for key, value in current_layout.items():
      if key in recorded_layout and recorded_layout[key] != value:
        changes.append((key, recorded_layout[key], value))
  unsafe = [c for c in changes if not is_safe(c[0])]
  for key, before, after in changes:
    level = logging.WARNING if (key, before, after) in unsafe else logging.INFO
    logging.log(level, 'resume: %s changed %s -> %s (recorded in %s)', key, before, after, source)
  if unsafe and not config.train.get('allow_config_changes', False):
    lines = '\n'.join(f'  {k}: {a!r} -> {b!r}' for k, a, b in unsafe)
    raise ResumeConfigError(
        f'the command changes what the checkpoints were made with ({source}); resuming would '
        f'not continue the same run:\n{lines}\nUse another --workdir, restore these values, or '
        'pass --config.train.allow_config_changes=True to resume with them knowingly')
  return [c[0] for c in changes]
