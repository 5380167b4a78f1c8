"""The config of a training run, read back from its workdir: the default `--config` of the
modes that read a checkpoint (eval, features, export), so that

    python -m kldino.main --mode=eval --workdir=DIR --config.data.name=folder ...

needs no config file; `--config.KEY=VALUE` overrides apply on top as usual.
"""
import json
import os

from kldino import files
from kldino.checkpoint import config_from_dict


def get_config(workdir):
  path = os.path.join(workdir, 'config.json')
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
  return config_from_dict(saved)
