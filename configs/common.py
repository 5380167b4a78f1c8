"""What config files share: reading the `FILE.py:ARG` argument."""
from __future__ import annotations

import ml_collections


def _converted(text: str, default, key: str):
  """`text` as the type of `default` (a bool from true/false, 1/0)."""
  if isinstance(default, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'config argument {key}={text}: use true or false')
    return text.lower() in ('true', '1')
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f'config argument {key}={text}: not a {type(default).__name__}') from None


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """The config argument `a,b,key=value,...` as a ConfigDict of `spec`'s keys (their defaults
  give the types): positional values fill the keys in spec's order, `key=value` sets one by name;
  keys not given keep their default. ValueError names an unknown key or a surplus value."""
  result = ml_collections.ConfigDict(spec)
  keys = list(spec)
  position = 0
  for part in filter(None, (arg or '').split(',')):
    key, has_name, value = part.partition('=')
    if has_name:
      if key not in spec:
        raise ValueError(f"config argument {part}: unknown key '{key}'; the keys are "
                         f"{', '.join(keys)}")
    else:
      if position >= len(keys):
        raise ValueError(f"config argument {arg!r} has more than the {len(keys)} values "
                         f"{', '.join(keys)}")
      key, value = keys[position], part
      position += 1
    result[key] = _converted(value, spec[key], key)
  return result
