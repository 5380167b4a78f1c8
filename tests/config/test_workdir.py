"""A workdir's saved config (kldino/config/workdir.py): keys renamed since it was written read with
their new names. (Workdirs written by earlier commits, evaluated and resumed:
tests/e2e/test_old_workdirs.py.)"""
from kldino.config.workdir import upgrade as config_from_dict
from kldino.config.defaults import base_config


def test_a_saved_config_with_renamed_keys_reads_with_the_new_names():
  """A workdir's config.json written before a key's rename restores the value under its new name."""
  saved = base_config().to_dict()
  saved.pop('prior_pass_batch_size')
  saved['sweep_batch_size'] = 96
  saved['eval'].pop('prior_pass_diagnostics')
  saved['eval']['sweep_diagnostics'] = True
  restored = config_from_dict(saved)
  assert (restored.prior_pass_batch_size, restored.eval.prior_pass_diagnostics) == (96, True)
  assert 'sweep_batch_size' not in restored and 'sweep_diagnostics' not in restored.eval


def test_a_config_saved_before_data_shuffle_keeps_its_shuffle_buffer():
  """Runs saved before data.shuffle read through data.shuffle_buffer's buffer: they keep it (a
  resumed epoch goes on in its order); a saved data.shuffle is kept, and today's default is the
  full permutation."""
  saved = base_config().to_dict()
  assert saved['data'].pop('shuffle') == 'permutation'
  assert config_from_dict(saved).data.shuffle == 'buffer'
  saved['data']['shuffle'] = 'permutation'
  assert config_from_dict(saved).data.shuffle == 'permutation'
