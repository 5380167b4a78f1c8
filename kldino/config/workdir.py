"""The config of an existing workdir, read back and upgraded to today's keys.

`get_config(WORKDIR)` is the default `--config` of the modes that read a checkpoint (eval,
linear_eval, features, export, attention), and `--config=WORKDIR/config.json` reads it for any
mode, so that

    python -m kldino.main --mode=eval --workdir=DIR --config.data.name=folder ...

needs no config file; `--config.KEY=VALUE` overrides apply on top as usual. `upgrade` turns a
config saved by any earlier kldino (config.json, a checkpoint's meta) into today's, the one place
that knows every change of the config since the first release (UPGRADES).
"""
from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple

import ml_collections

from kldino.config.defaults import base_config
from kldino.runtime import files

# Keys that have a new name: a config or command line with the old one is refused with the new
# one, and a saved config is read with the new one.
RENAMED_KEYS = {
    'sweep_batch_size': 'prior_pass_batch_size',
    'eval.sweep_diagnostics': 'eval.prior_pass_diagnostics',
}


def renamed_key_message(key: str) -> str:
  new = RENAMED_KEYS[key]
  return f'config key {key} is now {new}: set --config.{new} (or config.{new}) instead'


def flat_dict(config_dict: dict, prefix: str = '') -> dict:
  """{'a.b': value} of a nested config dict; lists (JSON's tuples) as tuples."""
  flat = {}
  for key, value in config_dict.items():
    if isinstance(value, dict):
      flat.update(flat_dict(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = tuple(value) if isinstance(value, list) else value
  return flat


def _has(flat: dict, key: str) -> bool:
  return key in flat or any(name.startswith(key + '.') for name in flat)


def _evaluators(flat: dict) -> dict:
  """The named evaluators: the final evaluation was k-NN, cluster statistics and the quick probe,
  `eval.every_epochs` ran the first two during training, `eval.linear_epochs` was the probe's
  epochs (the name now means DINO's linear evaluation) and `eval.knn_k` one int."""
  every = flat.pop('eval.every_epochs', 0)
  if 'eval.linear_epochs' in flat:
    flat['eval.probe_epochs'] = flat.pop('eval.linear_epochs')
  if isinstance(flat.get('eval.knn_k'), int):
    flat['eval.knn_k'] = (flat['eval.knn_k'],)
  for name, entry_type in (('knn', 'knn'), ('clusters', 'clusters'), ('linear_probe',
                                                                      'feature_probe')):
    flat.update({
        f'evals.{name}.type': entry_type,
        f'evals.{name}.every_epochs': every if name != 'linear_probe' else 0,
        f'evals.{name}.final': True
    })
  return flat


def _whole_image_eval_view(flat: dict) -> dict:
  """The evaluation view was the whole image resized to data.image_size (Resize(image_size) then
  the centre crop of the same size, for square images); the crops were bilinear."""
  return {
      **flat, 'data.eval_resize': flat.get('data.image_size', 0),
      'aug.crop_interpolation': 'bilinear'
  }


class Upgrade(NamedTuple):
  since: str  # the date of the change: a config written before it lacks `marker`
  marker: str  # a key every config written since has
  change: str  # what changed
  apply: Callable[[dict], dict]  # the flat saved config -> as it reads today
  resumable: bool = True  # False: a train state written before cannot be trained on


# Every change of the saved config since the first release, oldest first. A key added since a
# save takes today's default, which is what kldino did before the key existed, except where an
# entry here says otherwise; keys that no longer exist are dropped; renamed keys (RENAMED_KEYS)
# take their new names before any entry applies.
UPGRADES = (
    Upgrade('2026-11-24', 'objective.gap_examples',
            'the Jensen gap over the first objective.gap_examples (before: every example)',
            lambda flat: {
                **flat, 'objective.gap_examples': 0
            }),
    Upgrade('2026-11-30', 'evals',
            'named evaluators (evals.*), eval.knn_k a tuple, eval.probe_epochs', _evaluators),
    Upgrade('2026-11-30',
            'model.head_init',
            "DINO's head init and norm_last_layer, one Adam state per parameter group",
            lambda flat: flat,
            resumable=False),
    Upgrade('2026-11-30', 'data.eval_resize',
            "crops from the full-resolution image, DINO's Resize + CenterCrop evaluation view",
            _whole_image_eval_view),
    Upgrade('2026-11-30', 'data.max_corrupt_fraction',
            'images that cannot be decoded are skipped (before: the first one stopped the run)',
            lambda flat: {
                **flat, 'data.max_corrupt_fraction': 0.0
            }),
    Upgrade('2026-11-30', 'guard', 'the collapse guard (before: none)', lambda flat: {
        **flat, 'guard.collapse': 'off'
    }),
    Upgrade('2026-12-01', 'guard.constant_mi', "the collapse guard's constant kind", lambda flat: {
        **flat, 'guard.constant_mi': 0.0
    }),
    # Today's default: scoring more epochs adds linear_eval.json keys and changes none.
    Upgrade(
        '2026-12-07', 'eval.linear_eval_every_epochs',
        "--mode=linear_eval scores every eval.linear_eval_every_epochs epochs (DINO's best "
        'over the epochs) and trains on the last partial batch', lambda flat: flat),
    Upgrade('2026-12-07', 'data.shuffle',
            "data.shuffle, a full permutation per epoch (before: data.shuffle_buffer's buffer)",
            lambda flat: {
                **flat, 'data.shuffle': 'buffer'
            }),
)


def _saved_flat(saved: dict) -> dict:
  return {RENAMED_KEYS.get(key, key): value for key, value in flat_dict(saved).items()}


def written_by(saved: dict) -> str:
  """Which kldino wrote a saved config, as far as its keys tell: 'from before DATE' (the first
  change it predates) or 'from DATE on' (the last change)."""
  flat = _saved_flat(saved)
  missing = next((change for change in UPGRADES if not _has(flat, change.marker)), None)
  return f'from before {missing.since}' if missing else f'from {UPGRADES[-1].since} on'


def resume_refusal(saved: dict) -> str | None:
  """Why a train state saved with this config cannot be trained on by today's kldino (its
  evaluation, export and linear evaluation still work), or None."""
  flat = _saved_flat(saved)
  change = next((u for u in UPGRADES if not u.resumable and not _has(flat, u.marker)), None)
  if change is None:
    return None
  return (f'it was written by a kldino from before {change.since} ({change.change}), whose '
          'train state this one cannot train on: evaluate, export or linear-evaluate it '
          '(--mode=eval, export, linear_eval), or train in a new --workdir')


def upgrade(saved: dict) -> ml_collections.ConfigDict:
  """Today's config of a config dict saved by any kldino (config.json, a checkpoint's meta): the
  renames and UPGRADES, then the values on top of today's defaults."""
  flat = _saved_flat(saved)
  for change in UPGRADES:
    if not _has(flat, change.marker):
      flat = change.apply(dict(flat))
  config = base_config()
  for key, value in flat.items():
    if key.startswith('evals.'):
      continue  # the evaluators are named by the user: taken whole below
    parent, _, leaf = key.rpartition('.')
    node = config
    for part in filter(None, parent.split('.')):
      node = node.get(part) if hasattr(node, 'get') else None
    if node is not None and leaf in node:
      try:
        node[leaf] = value
      except TypeError as error:
        raise ValueError(f'{key}={value!r} of a config written by a kldino {written_by(saved)} '
                         f'cannot be read ({str(error).splitlines()[0]}): pass --config=FILE with '
                         'the config it trained with') from None
  config.evals = ml_collections.ConfigDict(
      _nested({
          key: value for key, value in flat.items() if key.startswith('evals.')
      })['evals'])
  return config


def _nested(flat: dict) -> dict:
  nested = {}
  for key, value in flat.items():
    *parents, leaf = key.split('.')
    node = nested
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return nested


def get_config(workdir_or_file):
  """The upgraded config of a workdir (its config.json) or of a saved config .json itself."""
  path = (workdir_or_file if workdir_or_file.endswith('.json') else os.path.join(
      workdir_or_file, 'config.json'))
  try:
    saved = files.read_json(path)
  except FileNotFoundError:
    raise ValueError(f'{path} does not exist: pass --config=FILE, or the --workdir of a '
                     'training run') from None
  except json.JSONDecodeError as error:
    raise ValueError(
        f'{path} does not parse (line {error.lineno}: {error.msg}): restore it '
        'from the run, or pass --config=FILE with the config it trained with') from None
  if not isinstance(saved, dict):
    raise ValueError(f'{path} holds a JSON {type(saved).__name__}, not a config: pass '
                     '--config=FILE with the config the run trained with')
  return upgrade(saved)
