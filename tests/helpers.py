"""Small configs, the repo's config files, random batches, a folder of digits, and the one way the
tests run the repo's commands (run_kldino, start_kldino, signal_at_log_line)."""
import importlib
import os
import signal
import subprocess
import sys

import jax
import numpy as np

from kldino.config.defaults import base_config
from kldino.data import gram_crops
from kldino.data import masking

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
  """A training batch of normal noise; with iBOT, the masks of a data shard's batch too; with
  DINOv3's Gram teacher crops, those (noise too)."""
  rng = np.random.default_rng(seed)
  b, g, local = config.batch_size, config.aug.global_size, config.aug.local_size
  batch = {
      'global_crops':
          rng.standard_normal((b, 2, g, g, channels)).astype(np.float32),
      'local_crops':
          rng.standard_normal((b, config.aug.num_local, local, local, channels)).astype(np.float32),
  }
  if size := gram_crops.size(config):
    batch['gram_crops'] = rng.standard_normal((b, 2, size, size, channels)).astype(np.float32)
  if masking.used(config.objective):
    batch['masks'] = masking.training_masks(config,
                                            epoch=0,
                                            step=seed,
                                            first_row=0,
                                            rows=b,
                                            group=config.objective.ibot.mask_group_size or b)
  return batch


def dinov2_config(**objective_overrides):
  """tiny_config with DINOv2's objective: iBOT with its mask token, KoLeo."""
  config = tiny_config(mask_token=True, layerscale=0.1, num_registers=2)
  config.objective.ibot.loss_weight = 1.0
  config.objective.ibot.mask_group_size = 2  # the same masks on 1 device as on 8
  config.objective.koleo_weight = 0.1
  config.objective.update(objective_overrides)
  return config


def write_folder(root, per_class_train=12, per_class_test=4):
  """sklearn's digits as PNG files in the ImageFolder layout ROOT/<split>/<class>/<image>."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  counts = {}
  for image, label in zip(digits.images, digits.target):
    seen = counts.get(label, 0)
    if seen >= per_class_train + per_class_test:
      continue
    counts[label] = seen + 1
    split = 'train' if seen < per_class_train else 'test'
    folder = os.path.join(root, split, f'class_{label}')
    os.makedirs(folder, exist_ok=True)
    pixels = np.round(image * 255 / 16).astype(np.uint8)[..., None]
    tf.io.write_file(os.path.join(folder, f'{seen}.png'), tf.io.encode_png(pixels))


def assert_states_equal(actual, expected):
  """Two train states (or any trees) with the same structure and bit-identical leaves."""
  leaves_actual, tree_actual = jax.tree.flatten(actual)
  leaves_expected, tree_expected = jax.tree.flatten(expected)
  assert tree_actual == tree_expected
  for a, e in zip(leaves_actual, leaves_expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


# The command line. Every test that runs one of the repo's commands goes through these: `python -m
# MODULE ARGS...` (kldino.main unless another module is named: kldino.bench, launch.sweep, ...) with
# the repo as its working directory and its output captured as text. `env` holds variables set
# over this process's environment (None: the environment as it is).


def kldino_command(*args, module='kldino.main'):
  """The command line `python -m MODULE ARGS...`, as a list."""
  return [sys.executable, '-m', module, *args]


def _environ(env):
  return None if env is None else {**os.environ, **env}


def run_kldino(*args, module='kldino.main', env=None, timeout=600, check=False):
  """Runs `python -m MODULE ARGS...` in the repo to its end; the CompletedProcess. With `check`,
  asserts that it exited 0 (the message: the end of its stderr)."""
  result = subprocess.run(kldino_command(*args, module=module),
                          cwd=REPO,
                          env=_environ(env),
                          capture_output=True,
                          text=True,
                          timeout=timeout)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def start_kldino(*args, module='kldino.main', env=None, stdout=subprocess.PIPE):
  """Starts `python -m MODULE ARGS...` in the repo; the Popen, its stderr a text pipe (its stdout
  too, unless `stdout` says otherwise)."""
  return subprocess.Popen(kldino_command(*args, module=module),
                          cwd=REPO,
                          env=_environ(env),
                          stdout=stdout,
                          stderr=subprocess.PIPE,
                          text=True)


def signal_at_log_line(args, marker: str, signum=signal.SIGTERM):
  """Runs `python -m kldino.main ARGS...` in the repo, sends `signum` as soon as a stderr line
  holds `marker`; returns (exit code, stdout, all of stderr)."""
  process = start_kldino(*args)
  seen = []
  for line in process.stderr:
    seen.append(line)
    if marker in line:
      process.send_signal(signum)
      break
  stdout, rest = process.communicate(timeout=300)
  return process.returncode, stdout, ''.join(seen) + rest
