"""configs/common.py: a config's argument string fills keys by position or name, with their
types."""
import pytest


def test_config_arguments_fill_keys_by_position_or_name_with_their_types():
  from configs.common import parse_arg  # pylint: disable=import-outside-toplevel
  args = parse_arg('vit_b16,v5p-128,epochs=300,bf16=true',
                   model='',
                   hardware='',
                   epochs=100,
                   bf16=False,
                   lr=1e-3)
  assert (args.model, args.hardware, args.epochs, args.bf16, args.lr) == ('vit_b16', 'v5p-128', 300,
                                                                          True, 1e-3)
  assert parse_arg(None, model='s').model == 's'
  for arg, fragment in (('a,2,c', 'more than the 2 values'), ('size=3', "unknown key 'size'"),
                        ('epochs=many', 'epochs=many: not a int')):
    with pytest.raises(ValueError, match=fragment):
      parse_arg(arg, model='', epochs=1)
