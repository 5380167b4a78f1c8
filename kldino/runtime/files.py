"""A workdir's own small files (config.json, eval.json, linear_eval.json), on a local disk or
in a bucket (gs://...: TPU VM jobs write there): etils.epath opens either. Checkpoints go
through orbax, TensorBoard events through TensorFlow; both take the same paths."""
from __future__ import annotations

import json
import os

from etils import epath


def is_remote(path: str) -> bool:
  return '://' in path


def absolute(path: str) -> str:
  """A local path made absolute; a remote one (gs://bucket/...) as it is."""
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def write_json(path: str, value, **options):
  """`value` as JSON at `path`, its folder made first."""
  target = epath.Path(absolute(path))
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(json.dumps(value, indent=1, sort_keys=True, **options))


def read_json(path: str):
  """The JSON value at `path`; FileNotFoundError when there is none, json.JSONDecodeError when
  it does not parse."""
  return json.loads(epath.Path(absolute(path)).read_text())
