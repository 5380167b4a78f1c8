"""Cheap checks of a config, run before anything expensive starts: one clear line per problem."""
from __future__ import annotations

import math

from kldino.config import workdir
from kldino.errors import ConfigError
from kldino.core import guard
from kldino.core import objective
from kldino.core import schedules
from kldino.data import gram_crops
from kldino.models import validate_model_config
from kldino.models.layers import RESIZE_METHODS


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def validate_config(config, num_devices: int, num_processes: int = 1):
  for key in workdir.RENAMED_KEYS:
    parent, _, leaf = key.rpartition('.')
    _require(leaf not in (config.get(parent) if parent else config),
             workdir.renamed_key_message(key))
  objective_config = config.objective
  try:
    objective.get_normalization(objective_config)
    validate_model_config(config.model, image_sizes=(config.aug.global_size, config.aug.local_size))
  except ValueError as error:
    raise ConfigError(str(error)) from None
  _require(config.num_epochs >= 1, f'num_epochs={config.num_epochs} must be >= 1')
  _require(
      config.checkpoint_every_steps >= 1,
      f'checkpoint_every_steps={config.checkpoint_every_steps} must be >= 1 (a checkpoint '
      'is also written at the end and on SIGTERM)')
  _require(
      config.keep_checkpoints >= 1,
      f'keep_checkpoints={config.keep_checkpoints} must be >= 1 (older checkpoints are the '
      'fallback when the latest is unreadable: 2 or more is safer)')
  _require(
      config.batch_size >= 1 and config.batch_size % num_devices == 0,
      f'batch_size={config.batch_size} must be a positive multiple of the {num_devices} '
      f'devices (global batch); set --config.batch_size to a multiple of {num_devices}')
  _require(config.batch_size % num_processes == 0,
           f'batch_size={config.batch_size} must divide evenly over {num_processes} processes')
  shards = config.data.shards or num_processes
  _require(
      config.data.shards >= 0 and shards % num_processes == 0,
      f'data.shards={config.data.shards} must be 0 (one per process) or a multiple of the '
      f'{num_processes} processes')
  for key, value in (('batch_size', config.batch_size), ('prior_pass_batch_size',
                                                         config.prior_pass_batch_size),
                     ('eval.batch_size', config.eval.batch_size), ('eval.linear_batch_size',
                                                                   config.eval.linear_batch_size)):
    _require(
        value % shards == 0,
        f'{key}={value} must be a multiple of the {shards} data shards (data.shards): '
        'change either')
  _require(
      config.prior_pass_batch_size % num_devices == 0,
      f'prior_pass_batch_size={config.prior_pass_batch_size} must be a multiple of the '
      f'{num_devices} devices')
  _require(
      config.eval.batch_size % num_devices == 0,
      f'eval.batch_size={config.eval.batch_size} must be a multiple of the '
      f'{num_devices} devices')
  _require(
      objective_config.prior_every_epochs >= 1,
      f'objective.prior_every_epochs (T) = {objective_config.prior_every_epochs} must be '
      '>= 1 epoch')
  _require(
      objective_config.teacher_temp_warmup in ('per_epoch', 'per_step'),
      f"objective.teacher_temp_warmup='{objective_config.teacher_temp_warmup}': use "
      "'per_epoch' (DINO) or 'per_step' (DINOv2)")
  _require(objective_config.prior_init in ('sweep', 'uniform'),
           f"objective.prior_init='{objective_config.prior_init}': use 'sweep' or 'uniform'")
  for key in ('teacher_temp', 'warmup_teacher_temp', 'student_temp'):
    value = objective_config[key]
    _require(value > 0, f'objective.{key}={value} must be > 0')
  _require(0 < objective_config.prior_eps < 1,
           f'objective.prior_eps={objective_config.prior_eps} must be in (0, 1)')
  _require(config.model.num_prototypes >= 2,
           f'model.num_prototypes={config.model.num_prototypes} must be >= 2')
  _require(config.eval.knn_temperature > 0,
           f'eval.knn_temperature={config.eval.knn_temperature} must be > 0')
  _validate_optim(config)
  _validate_dinov2(config, num_devices, num_processes)
  _validate_gram(config, num_devices)
  _validate_aug(config)
  _validate_eval(config, num_devices)
  _validate_guard(config.guard)
  _require(config.data.name != 'folder' or bool(config.data.path),
           "data.name='folder' needs --config.data.path=ROOT (ROOT/<split>/<class>/<image>)")
  _require(
      len(config.data.mean) == len(config.data.std),
      'data.mean and data.std must have one value per channel')


def _positive_finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _validate_dinov2(config, num_devices: int, num_processes: int):
  """DINOv2's terms: iBOT, its patch normalisation and masks, KoLeo."""
  objective_config, ibot = config.objective, config.objective.ibot
  try:
    objective.get_patch_normalization(objective_config)
  except ValueError as error:
    raise ConfigError(
        str(error).replace('objective.normalization', 'objective.patch_normalization')) from None
  _require(ibot.loss_weight >= 0, f'objective.ibot.loss_weight={ibot.loss_weight} must be >= 0 '
           '(0: no iBOT)')
  if ibot.loss_weight > 0:
    _require(
        config.model.name.startswith('vit'),
        f'objective.ibot.loss_weight={ibot.loss_weight} masks patches: model.name='
        f'{config.model.name} has none; use a vit_* model or set the weight to 0')
    _require(
        config.model.mask_token, 'iBOT (objective.ibot.loss_weight > 0) needs the mask token: set '
        '--config.model.mask_token=True')
  _require(
      0 <= ibot.mask_sample_probability <= 1,
      f'objective.ibot.mask_sample_probability={ibot.mask_sample_probability} must be in '
      '[0, 1]')
  low, high = ibot.mask_ratio_min_max
  _require(
      0 <= low <= high <= 1,
      f'objective.ibot.mask_ratio_min_max={tuple(ibot.mask_ratio_min_max)} must satisfy '
      '0 <= low <= high <= 1')
  mask_group = ibot.mask_group_size or config.batch_size // num_devices
  _require(
      ibot.mask_group_size >= 0 and (config.batch_size // num_devices) % mask_group == 0 and
      (config.batch_size // num_processes) % mask_group == 0,
      f'objective.ibot.mask_group_size={ibot.mask_group_size} must be 0 (each device\'s images) '
      f'or divide the {config.batch_size // num_devices} images of a device')
  group = objective_config.koleo_group_size
  _require(objective_config.koleo_weight >= 0,
           f'objective.koleo_weight={objective_config.koleo_weight} must be >= 0 (0: no KoLeo)')
  _require(
      group == 0 or (group >= 2 and config.batch_size % group == 0),
      f'objective.koleo_group_size={group} must be 0 (the whole batch) or >= 2 and divide '
      f'batch_size={config.batch_size}')


def _validate_gram(config, num_devices: int):
  """DINOv3's Gram anchoring (gram.*), when gram.use."""
  gram = config.gram
  if not gram.use:
    return
  _require(
      config.model.name.startswith('vit'),
      f'gram.use=True compares patch features: model.name={config.model.name} has none; use a '
      'vit_* model or set gram.use=False')
  _require(
      _finite(gram.loss_weight) and gram.loss_weight >= 0,
      f'gram.loss_weight={gram.loss_weight} must be finite and >= 0')
  for key in ('ramp_steps', 'start_step', 'refresh_every', 'max_refreshes'):
    _require(
        isinstance(gram[key], int) and gram[key] >= 0,
        f'gram.{key}={gram[key]} must be an integer >= 0')
  scale, size = gram.teacher_resolution_scale, gram_crops.size(config)
  _require(_positive_finite(scale), f'gram.teacher_resolution_scale={scale} must be > 0')
  _require(
      gram.undistorted or scale == 1,
      f'gram.teacher_resolution_scale={scale} needs crops of their own: set gram.undistorted=True '
      '(the Gram teacher then sees the undistorted crops) or the scale to 1')
  _require(
      not size or size % config.model.patch_size == 0,
      f'the Gram teacher crops (gram.teacher_resolution_scale x aug.global_size = {size} px) '
      f'must be a multiple of model.patch_size={config.model.patch_size}: change the scale')
  _require(gram.resize_method in RESIZE_METHODS,
           f"gram.resize_method='{gram.resize_method}': use one of {', '.join(RESIZE_METHODS)}")
  _require(not (gram.remove_neg and gram.remove_only_teacher_neg),
           'gram.remove_neg and gram.remove_only_teacher_neg exclude each other: set one False')
  group = gram.group_size or config.batch_size // num_devices
  _require(
      gram.img_level or (gram.group_size >= 0 and (config.batch_size // num_devices) % group == 0),
      f'gram.group_size={gram.group_size} must be 0 (each device\'s images) or divide the '
      f'{config.batch_size // num_devices} images of a device')


def _validate_optim(config):
  optim_config = config.optim
  _require(
      optim_config.lr_scaling in schedules.LR_SCALINGS,
      f"unknown optim.lr_scaling '{optim_config.lr_scaling}': choose one of "
      f"{', '.join(schedules.LR_SCALINGS)}")
  _require(0 < optim_config.layerwise_decay <= 1,
           f'optim.layerwise_decay={optim_config.layerwise_decay} must be in (0, 1] (1: none)')
  _require(optim_config.patch_embed_lr_mult > 0,
           f'optim.patch_embed_lr_mult={optim_config.patch_embed_lr_mult} must be > 0')
  _require(
      optim_config.layerwise_decay == 1 or config.model.name.startswith('vit'),
      f'optim.layerwise_decay={optim_config.layerwise_decay} decays by ViT block: model.name='
      f'{config.model.name} has none; use a vit_* model or set it to 1')
  _require(_positive_finite(optim_config.lr),
           f'optim.lr={optim_config.lr} must be finite and > 0 (per 256 images)')
  _require(
      _finite(optim_config.min_lr) and 0 <= optim_config.min_lr <= optim_config.lr,
      f'optim.min_lr={optim_config.min_lr} must be in [0, optim.lr={optim_config.lr}]')
  for key in ('weight_decay', 'weight_decay_end', 'clip_grad'):
    _require(
        _finite(optim_config[key]) and optim_config[key] >= 0,
        f'optim.{key}={optim_config[key]} must be finite and >= 0 (clip_grad 0: no '
        'clipping)')
  for key in ('warmup_epochs', 'freeze_prototypes_epochs'):
    _require(optim_config[key] >= 0, f'optim.{key}={optim_config[key]} must be >= 0')
  for key in ('teacher_momentum', 'teacher_momentum_end'):
    _require(
        _finite(optim_config[key]) and 0 <= optim_config[key] <= 1,
        f'optim.{key}={optim_config[key]} must be in [0, 1] (the EMA keeps this fraction '
        'of the teacher)')


def _validate_aug(config):
  aug = config.aug
  for key in ('global_size', 'local_size'):
    _require(aug[key] >= 1, f'aug.{key}={aug[key]} must be >= 1 pixel')
  _require(aug.num_local >= 0, f'aug.num_local={aug.num_local} must be >= 0')
  _require(
      aug.crop_interpolation in ('bicubic', 'bilinear'),
      f"aug.crop_interpolation='{aug.crop_interpolation}': use 'bicubic' (DINO's) or "
      "'bilinear'")
  for key in ('global_scale', 'local_scale'):
    low, high = aug[key]
    _require(
        0 < low <= high <= 1, f'aug.{key}={tuple(aug[key])} must satisfy 0 < low <= high '
        '<= 1 (fractions of the image area)')
  probabilities = [('color_jitter_prob', aug.color_jitter_prob),
                   ('grayscale_prob', aug.grayscale_prob), ('solarize_prob', aug.solarize_prob),
                   *((f'blur_prob[{i}]', p) for i, p in enumerate(aug.blur_prob))]
  for key, value in probabilities:
    _require(_finite(value) and 0 <= value <= 1, f'aug.{key}={value} must be in [0, 1]')
  _require(
      len(aug.blur_prob) == 3, f'aug.blur_prob={tuple(aug.blur_prob)} must have 3 '
      'probabilities: global view 1, global view 2, local views')
  _require(0 < aug.blur_sigma[0] <= aug.blur_sigma[1],
           f'aug.blur_sigma={tuple(aug.blur_sigma)} must satisfy 0 < low <= high')
  _require(config.data.image_size >= 1,
           f'data.image_size={config.data.image_size} must be >= 1 pixel')
  _require(
      config.data.shuffle in ('permutation', 'buffer'),
      f"data.shuffle='{config.data.shuffle}': use 'permutation' (a full permutation of each "
      "data shard per epoch, DINO's) or 'buffer' (a shuffle buffer of data.shuffle_buffer "
      'examples)')
  fraction = config.data.max_corrupt_fraction
  _require(
      _finite(fraction) and 0 <= fraction <= 1,
      f'data.max_corrupt_fraction={fraction} must be in [0, 1] (0: stop at the first image '
      'that cannot be decoded)')


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def _validate_guard(guard_config):
  _require(guard_config.collapse in guard.MODES,
           f"guard.collapse='{guard_config.collapse}': choose one of {', '.join(guard.MODES)}")
  _require(guard_config.patience_epochs >= 1,
           f'guard.patience_epochs={guard_config.patience_epochs} must be >= 1')
  _require(
      guard_config.min_clusters > 1,
      f'guard.min_clusters={guard_config.min_clusters} must be > 1 (a run of one cluster '
      'has exactly 1)')
  _require(
      0 < guard_config.uniform_entropy < 1,
      f'guard.uniform_entropy={guard_config.uniform_entropy} must be in (0, 1): a fraction '
      'of log K')
  _require(guard_config.uniform_mi > 0, f'guard.uniform_mi={guard_config.uniform_mi} must be > 0')
  _require(
      guard_config.constant_mi >= 0,
      f'guard.constant_mi={guard_config.constant_mi} must be >= 0 (0: the constant kind is '
      'off)')


def _validate_eval(config, num_devices: int):
  """The evaluation keys: eval.* and the config.evals entries."""
  eval_config = config.eval
  ks = eval_config.knn_k if isinstance(eval_config.knn_k, (tuple, list)) else (eval_config.knn_k,)
  _require(
      len(ks) >= 1 and all(isinstance(k, int) and k >= 1 for k in ks),
      f'eval.knn_k={eval_config.knn_k} must be one k >= 1 or a tuple of them, e.g. '
      '(10, 20, 100, 200)')
  _require(eval_config.n_last_blocks >= 1,
           f'eval.n_last_blocks={eval_config.n_last_blocks} must be >= 1')
  _require(
      not eval_config.avgpool_patchtokens or eval_config.n_last_blocks == 1,
      'eval.avgpool_patchtokens=True works with eval.n_last_blocks=1 (as in DINO): set '
      'one of them back')
  lrs = tuple(eval_config.linear_lrs) or (eval_config.linear_lr,)
  _require(all(_positive_finite(lr) for lr in lrs),
           f'eval.linear_lr / eval.linear_lrs = {lrs}: every learning rate must be finite and > 0')
  for key in ('linear_epochs', 'linear_eval_every_epochs', 'probe_epochs'):
    _require(eval_config[key] >= 1, f'eval.{key}={eval_config[key]} must be >= 1')
  _require(
      eval_config.linear_batch_size >= 1 and eval_config.linear_batch_size % num_devices == 0,
      f'eval.linear_batch_size={eval_config.linear_batch_size} must be a positive multiple '
      f'of the {num_devices} devices')
  low, high = eval_config.linear_crop_scale
  _require(
      0 < low <= high <= 1, f'eval.linear_crop_scale={tuple(eval_config.linear_crop_scale)} '
      'must satisfy 0 < low <= high <= 1 (fractions of the image area)')
  for name, entry in config.evals.items():
    _require(
        isinstance(entry.get('type'), str) and isinstance(entry.get('final'), bool) and
        isinstance(entry.get('every_epochs'), int) and entry.every_epochs >= 0,
        f'evals.{name} must have type (an evaluator name), every_epochs (>= 0: 0 is not '
        'during training) and final (True or False)')
