"""Small configs, the repo's config files, random batches and subprocess helpers shared by the
tests."""
import importlib
import os
import signal
import subprocess

import numpy as np

from kldino.config.defaults import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_module(name):
  """The module of configs/NAME.py (its get_config, and any helpers it defines)."""
  return importlib.import_module(f'configs.{name}')


def tiny_config(**model_overrides):
  """A model that compiles and steps in seconds, with every code path of the real one."""
  config = base_config()
  config.batch_size = 16
  config.aug.global_size = 16
  config.aug.local_size = 8
  config.aug.num_local = 2
  config.data.image_size = 16
  config.model.name = 'vit_nano'
  config.model.patch_size = 4
  config.model.drop_path = 0.1
  config.model.num_prototypes = 16
  config.model.head_hidden_dim = 32
  config.model.head_bottleneck_dim = 8
  config.model.head_norm = 'batch'
  config.model.update(model_overrides)
  config.optim.freeze_prototypes_epochs = 0
  config.mesh.fsdp_min_size = 1
  return config


def random_batch(config, seed=0, channels=1):
  rng = np.random.default_rng(seed)
  b, g, local = config.batch_size, config.aug.global_size, config.aug.local_size
  return {
      'global_crops':
          rng.standard_normal((b, 2, g, g, channels)).astype(np.float32),
      'local_crops':
          rng.standard_normal((b, config.aug.num_local, local, local, channels)).astype(np.float32),
  }


def signal_at_log_line(command, marker: str, signum=signal.SIGTERM):
  """Runs `command` in the repo, sends `signum` as soon as a stderr line holds `marker`; returns
  (exit code, stdout, all of stderr)."""
  process = subprocess.Popen(command,
                             cwd=REPO,
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE,
                             text=True)
  seen = []
  for line in process.stderr:
    seen.append(line)
    if marker in line:
      process.send_signal(signum)
      break
  stdout, rest = process.communicate(timeout=300)
  return process.returncode, stdout, ''.join(seen) + rest
