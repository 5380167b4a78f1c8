"""The config of a training run, read back from its workdir: the default `--config` of the
modes that read a checkpoint (eval, features, export), so that

    python -m kldino.main --mode=eval --workdir=DIR --config.data.name=folder ...

needs no config file; `--config.KEY=VALUE` overrides apply on top as usual.
"""
import json
import os

from kldino.checkpoint import config_from_dict


def get_config(workdir):
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{path} does not exist: pass --config=FILE, or the --workdir of a '
                     'training run')
  with open(path) as f:
    return config_from_dict(json.load(f))
