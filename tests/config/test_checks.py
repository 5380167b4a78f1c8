"""Bad config values fail fast with one clear line (kldino/config/checks.py)."""
import pytest

from kldino.config.checks import validate_config
from kldino.errors import ConfigError
from kldino.config.defaults import base_config


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
    ('eval.linear_eval_every_epochs', 0, 'eval.linear_eval_every_epochs=0 must be >= 1'),
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
    ('objective.patch_normalization', 'centre',
     "unknown objective.patch_normalization 'centre': choose one of"),
    ('objective.ibot.loss_weight', 1.0, 'masks patches: model.name=convnet_small has none'),
    ('objective.ibot.mask_ratio_min_max', (0.5, 0.1), 'must satisfy 0 <= low <= high <= 1'),
    ('objective.ibot.mask_sample_probability', 1.5, 'must be in [0, 1]'),
    ('objective.koleo_group_size', 24, 'objective.koleo_group_size=24 must be 0'),
    ('optim.lr_scaling', 'sqrt', "unknown optim.lr_scaling 'sqrt': choose one of"),
    ('optim.layerwise_decay', 0.9, 'decays by ViT block: model.name=convnet_small has none'),
    ('optim.patch_embed_lr_mult', 0.0, 'optim.patch_embed_lr_mult=0.0 must be > 0'),
    ('model.ffn', 'geglu', "unknown model.ffn 'geglu'"),
    ('data.shuffle', 'random', "data.shuffle='random': use 'permutation'"),
])
def test_bad_values_are_refused_with_one_line(key, value, fragment):
  config = base_config()
  if key == 'eval.avgpool_patchtokens':
    config.eval.n_last_blocks = 4
  if key == 'model.ffn':
    config.model.name = 'vit_nano'
  section, _, name = key.rpartition('.')
  node = config
  for part in filter(None, section.split('.')):
    node = node[part]
  node[name] = value
  with pytest.raises(ConfigError) as error:
    validate_config(config, num_devices=8)
  assert fragment in str(error.value)
  assert '\n' not in str(error.value)


def test_ibot_needs_the_mask_token():
  config = base_config()
  config.model.name, config.objective.ibot.loss_weight = 'vit_nano', 1.0
  with pytest.raises(ConfigError, match='set --config.model.mask_token=True'):
    validate_config(config, num_devices=8)
  config.model.mask_token = True
  validate_config(config, num_devices=8)


@pytest.mark.parametrize('key, value, fragment', [
    ('model.name', 'convnet_small', 'gram.use=True compares patch features'),
    ('gram.loss_weight', -1.0, 'gram.loss_weight=-1.0 must be finite and >= 0'),
    ('gram.refresh_every', -5, 'gram.refresh_every=-5 must be an integer >= 0'),
    ('gram.teacher_resolution_scale', 0.0, 'gram.teacher_resolution_scale=0.0 must be > 0'),
    ('gram.teacher_resolution_scale', 1.25, '(gram.teacher_resolution_scale x aug.global_size = '
     '20 px) must be a multiple of model.patch_size=8'),
    ('gram.undistorted', False, 'set gram.undistorted=True'),
    ('gram.resize_method', 'nearest', "gram.resize_method='nearest': use one of bicubic, bilinear"),
    ('gram.remove_only_teacher_neg', True, 'exclude each other'),
    ('gram.img_level', False, 'gram.group_size=3 must be 0'),
])
def test_bad_gram_values_are_refused_with_one_line(key, value, fragment):
  config = base_config()
  config.model.name, config.model.patch_size = 'vit_nano', 8
  config.gram.use, config.gram.teacher_resolution_scale = True, 2.0
  config.gram.remove_neg, config.gram.group_size = True, 3
  section, _, name = key.rpartition('.')
  config[section][name] = value
  validate_config(base_config(), num_devices=8)  # gram.use=False: its keys are not read
  with pytest.raises(ConfigError) as error:
    validate_config(config, num_devices=8)
  assert fragment in str(error.value) and '\n' not in str(error.value)
