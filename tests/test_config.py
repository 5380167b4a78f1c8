"""Bad config values fail fast with one clear line; the ImageNet recipe builds abstractly."""
import os
import subprocess
import sys

import jax
import pytest

from kldino.core import optim
from kldino.core import schedules
from kldino.core import step
from kldino.config.workdir import upgrade as config_from_dict
from kldino.config.checks import validate_config
from kldino.errors import ConfigError
from kldino.config.defaults import base_config
from tests.helpers import config_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('key, value, fragment', [
    ('batch_size', 60, 'batch_size=60 must be a positive multiple of the 8 devices'),
    ('objective.prior_every_epochs', 0, 'prior_every_epochs (T) = 0 must be >= 1'),
    ('objective.teacher_temp', 0.0, 'objective.teacher_temp=0.0 must be > 0'),
    ('objective.student_temp', -0.1, 'objective.student_temp=-0.1 must be > 0'),
    ('model.num_prototypes', 1, 'num_prototypes'),
    ('model.name', 'vit_gigantic', "unknown model.name 'vit_gigantic'"),
    ('objective.normalization', 'whiten', "unknown objective.normalization 'whiten'"),
    ('eval.knn_k', (10, 0), 'eval.knn_k=(10, 0) must be one k >= 1 or a tuple of them'),
    ('eval.n_last_blocks', 0, 'eval.n_last_blocks=0 must be >= 1'),
    ('eval.avgpool_patchtokens', True, 'eval.avgpool_patchtokens=True works with '
     'eval.n_last_blocks=1'),
    ('eval.linear_lrs', (1e-3, float('nan')), 'every learning rate must be finite and > 0'),
    ('eval.linear_lr', -1e-3, 'every learning rate must be finite and > 0'),
    ('eval.linear_batch_size', 100, 'eval.linear_batch_size=100 must be a positive multiple'),
    ('eval.linear_epochs', 0, 'eval.linear_epochs=0 must be >= 1'),
    ('eval.linear_crop_scale', (0.5, 0.1), 'must satisfy 0 < low <= high <= 1'),
    ('optim.lr', float('nan'), 'optim.lr=nan must be finite and > 0'),
    ('optim.lr', -1e-3, 'optim.lr=-0.001 must be finite and > 0'),
    ('optim.min_lr', 1.0, 'optim.min_lr=1.0 must be in [0, optim.lr'),
    ('optim.weight_decay', -0.1, 'optim.weight_decay=-0.1 must be finite and >= 0'),
    ('optim.teacher_momentum', 1.5, 'optim.teacher_momentum=1.5 must be in [0, 1]'),
    ('optim.warmup_epochs', -1, 'optim.warmup_epochs=-1 must be >= 0'),
    ('aug.global_size', 0, 'aug.global_size=0 must be >= 1 pixel'),
    ('aug.num_local', -2, 'aug.num_local=-2 must be >= 0'),
    ('aug.local_scale', (0.0, 0.4), 'aug.local_scale=(0.0, 0.4) must satisfy 0 < low'),
    ('aug.solarize_prob', 1.5, 'aug.solarize_prob=1.5 must be in [0, 1]'),
    ('aug.blur_prob', (1.0, 0.1), 'must have 3 probabilities'),
    ('aug.blur_sigma', (2.0, 0.1), 'aug.blur_sigma=(2.0, 0.1) must satisfy 0 < low <= high'),
    ('sweep_batch_size', 128, 'config key sweep_batch_size is now prior_pass_batch_size'),
    ('eval.sweep_diagnostics', True, 'eval.sweep_diagnostics is now eval.prior_pass_diagnostics'),
])
def test_bad_values_are_refused_with_one_line(key, value, fragment):
  config = base_config()
  if key == 'eval.avgpool_patchtokens':
    config.eval.n_last_blocks = 4
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError) as error:
    validate_config(config, num_devices=8)
  assert fragment in str(error.value)
  assert '\n' not in str(error.value)


def run_main(tmp_path, *overrides):
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([
      sys.executable, '-m', 'kldino.main', '--config=configs/digits.py', f'--workdir={tmp_path}',
      *overrides
  ],
                        cwd=REPO,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=300)


@pytest.mark.parametrize('overrides, fragment, code', [
    (('--config.data.name=no_such_dataset',), "unknown dataset 'no_such_dataset'", 3),
    (('--config.data.name=folder', '--config.data.path=/no/such/folder'), '/no/such/folder', 3),
    (('--config.batch_size=12',), 'batch_size=12 must be a positive multiple of the 8 devices', 2),
    (('--config.sweep_batch_size=64',), 'sweep_batch_size is now prior_pass_batch_size: set '
     '--config.prior_pass_batch_size', 2),
])
def test_command_line_fails_fast_with_one_line(tmp_path, overrides, fragment, code):
  """Exit code 3 for the dataset, 2 for a config value (README, exit codes)."""
  result = run_main(tmp_path, *overrides)
  assert result.returncode == code
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('kldino: ') and fragment in last_line, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


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


def load_config(name):
  return config_module(name).get_config()


def test_imagenet_vit_s16_recipe_builds_abstractly():
  config = load_config('imagenet_vit_s16')
  assert (config.model.name, config.model.patch_size) == ('vit_small', 16)
  assert config.model.num_prototypes == 65536 and config.model.head_bottleneck_dim == 256
  assert (config.aug.global_size, config.aug.local_size, config.aug.num_local) == (224, 96, 8)
  assert config.optim.lr == 5e-4 and config.optim.clip_grad == 3.0
  assert config.optim.teacher_momentum == 0.996 and config.objective.student_temp == 0.1
  assert (config.objective.warmup_teacher_temp, config.objective.teacher_temp,
          config.objective.warmup_teacher_temp_epochs) == (0.04, 0.04, 0)
  assert config.objective.normalization == 'prior' and config.objective.prior_source == 'sweep'
  validate_config(config, num_devices=8)

  steps_per_epoch = 1281167 // config.batch_size
  scheds = schedules.make_schedules(config, steps_per_epoch)
  optimizer = optim.make_optimizer(config.optim, scheds)
  graphdef, abstract_params = step.build_graphdef(config, in_channels=3)
  backbone_size = sum(x.size for x in jax.tree.leaves(abstract_params['backbone']))
  assert 21.5e6 < backbone_size < 22.0e6, backbone_size  # ViT-S/16: 21.7M
  abstract_state = jax.eval_shape(step.make_init_fn(config, 3, optimizer), 0)
  batch = {
      'global_crops': jax.ShapeDtypeStruct((config.batch_size, 2, 224, 224, 3), 'float32'),
      'local_crops': jax.ShapeDtypeStruct((config.batch_size, 8, 96, 96, 3), 'float32'),
  }
  train_step = step.make_train_step(graphdef, config, scheds, optimizer)
  new_state, metrics = jax.eval_shape(train_step, abstract_state, batch)
  assert jax.tree.map(lambda x: (x.shape, x.dtype),
                      new_state) == jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
  assert new_state.norm_state['log_prior'].shape == (65536,)
  assert metrics['loss'].shape == ()
  # The schedules of the recipe: peak lr scaled by batch / 256, tau_t 0.04 throughout.
  assert abs(float(scheds.learning_rate(10 * steps_per_epoch)) - 1e-3) < 1e-6
  assert abs(float(scheds.teacher_temp(30 * steps_per_epoch)) - 0.04) < 1e-7


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
