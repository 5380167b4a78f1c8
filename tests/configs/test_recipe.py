"""configs/imagenet_vit_s16.py is DINO's official ViT-S/16 100-epoch run, value by value, and
configs/imagenet_vit_s16_boost.py its README's "boosted" 300-epoch run; the recipe's train step
builds abstractly at full size.

Sources are facebookresearch/dino: main_dino.py's argparse defaults for `--arch vit_small` on
8 GPUs (README, "Vanilla DINO training": --nproc_per_node=8), its DINOLoss and
DataAugmentationDINO, utils.py, vision_transformer.py's DINOHead, eval_knn.py, eval_linear.py.
"""
import jax
import numpy as np
import pytest

from kldino.core import objective
from kldino.core import optim
from kldino.core import schedules
from kldino.core import step as step_lib
from kldino.config.checks import validate_config
from tests.helpers import config_module

STEPS_PER_EPOCH = 1_281_167 // 512

# (config key, DINO's value, where DINO sets it)
OFFICIAL = [
    ('seed', 0, 'main_dino.py --seed'),
    ('num_epochs', 100, 'main_dino.py --epochs'),
    ('batch_size', 512, 'main_dino.py --batch_size_per_gpu 64 x README --nproc_per_node=8'),
    ('data.name', 'imagenet2012', 'README: --data_path /path/to/imagenet/train'),
    ('data.mean', (0.485, 0.456, 0.406), 'main_dino.py DataAugmentationDINO Normalize'),
    ('data.std', (0.229, 0.224, 0.225), 'main_dino.py DataAugmentationDINO Normalize'),
    # Multi-crop
    ('aug.global_size', 224, 'main_dino.py DataAugmentationDINO RandomResizedCrop(224)'),
    ('aug.local_size', 96, 'main_dino.py DataAugmentationDINO RandomResizedCrop(96)'),
    ('aug.num_local', 8, 'main_dino.py --local_crops_number'),
    ('aug.global_scale', (0.4, 1.0), 'main_dino.py --global_crops_scale'),
    ('aug.local_scale', (0.05, 0.4), 'main_dino.py --local_crops_scale'),
    ('aug.flip', True, 'main_dino.py DataAugmentationDINO RandomHorizontalFlip(p=0.5)'),
    ('aug.color_jitter', (0.4, 0.4, 0.2, 0.1),
     'main_dino.py DataAugmentationDINO ColorJitter(brightness, contrast, saturation, hue)'),
    ('aug.color_jitter_prob', 0.8, 'main_dino.py DataAugmentationDINO RandomApply(p=0.8)'),
    ('aug.grayscale_prob', 0.2, 'main_dino.py DataAugmentationDINO RandomGrayscale(p=0.2)'),
    ('aug.blur_prob', (1.0, 0.1, 0.5),
     'main_dino.py DataAugmentationDINO GaussianBlur(1.0) / GaussianBlur(0.1) / (p=0.5)'),
    ('aug.blur_sigma', (0.1, 2.0), 'utils.py GaussianBlur radius_min / radius_max'),
    ('aug.solarize_prob', 0.2, 'main_dino.py DataAugmentationDINO Solarization(0.2), view 2'),
    # Model
    ('model.name', 'vit_small', 'main_dino.py --arch'),
    ('model.patch_size', 16, 'main_dino.py --patch_size'),
    ('model.stem', 'patch', 'vision_transformer.py PatchEmbed (one strided conv)'),
    ('model.drop_path', 0.1, 'main_dino.py --drop_path_rate'),
    ('model.num_prototypes', 65536, 'main_dino.py --out_dim'),
    ('model.norm_last_layer', True, 'main_dino.py --norm_last_layer'),
    ('model.head_norm', 'none', 'main_dino.py --use_bn_in_head False'),
    ('model.head_hidden_dim', 2048, 'vision_transformer.py DINOHead hidden_dim'),
    ('model.head_bottleneck_dim', 256, 'vision_transformer.py DINOHead bottleneck_dim'),
    ('model.head_num_layers', 3, 'vision_transformer.py DINOHead nlayers'),
    ('model.head_init', 'dino', 'vision_transformer.py DINOHead._init_weights trunc_normal_ .02'),
    ('model.prototype_init_std', 0.0,
     'vision_transformer.py DINOHead last_layer: nn.Linear default init, then weight_norm'),
    ('model.prototypes', 'learned', 'vision_transformer.py DINOHead last_layer (trained)'),
    # Teacher and loss
    ('optim.teacher_momentum', 0.996, 'main_dino.py --momentum_teacher'),
    ('optim.teacher_momentum_end', 1.0, 'main_dino.py momentum_schedule cosine_scheduler(.., 1)'),
    ('objective.warmup_teacher_temp', 0.04, 'main_dino.py --warmup_teacher_temp'),
    ('objective.teacher_temp', 0.04, 'main_dino.py --teacher_temp'),
    ('objective.warmup_teacher_temp_epochs', 0, 'main_dino.py --warmup_teacher_temp_epochs'),
    ('objective.student_temp', 0.1, 'main_dino.py DINOLoss student_temp'),
    ('objective.center_momentum', 0.9, 'main_dino.py DINOLoss center_momentum'),
    # Optimisation
    ('optim.lr', 5e-4, 'main_dino.py --lr (per 256 images)'),
    ('optim.min_lr', 1e-6, 'main_dino.py --min_lr'),
    ('optim.warmup_epochs', 10, 'main_dino.py --warmup_epochs'),
    ('optim.weight_decay', 0.04, 'main_dino.py --weight_decay'),
    ('optim.weight_decay_end', 0.4, 'main_dino.py --weight_decay_end'),
    ('optim.clip_grad', 3.0, 'main_dino.py --clip_grad'),
    ('optim.clip_mode', 'per_param', 'utils.py clip_gradients (each parameter\'s own norm)'),
    ('optim.freeze_prototypes_epochs', 1, 'main_dino.py --freeze_last_layer'),
    # Evaluation
    ('eval.knn_k', (10, 20, 100, 200), 'eval_knn.py --nb_knn'),
    ('eval.knn_temperature', 0.07, 'eval_knn.py --temperature'),
    ('eval.n_last_blocks', 4, 'eval_linear.py --n_last_blocks (ViT-S)'),
    ('eval.avgpool_patchtokens', False, 'eval_linear.py --avgpool_patchtokens (ViT-S)'),
    ('eval.linear_lr', 1e-3, 'eval_linear.py --lr'),
    ('eval.linear_epochs', 100, 'eval_linear.py --epochs'),
    ('eval.linear_batch_size', 1024, 'eval_linear.py --batch_size_per_gpu 128 x 8 GPUs'),
]

# What the README's boosted run changes: `run_with_submitit.py --arch vit_small --epochs 300
# --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false`.
BOOST = [
    ('num_epochs', 300, 'README Boosting DINO performance: --epochs 300'),
    ('batch_size', 1024, 'run_with_submitit.py --nodes 2 --ngpus 8 defaults, 64 per GPU'),
    ('objective.teacher_temp', 0.07, 'README Boosting DINO performance: --teacher_temp 0.07'),
    ('objective.warmup_teacher_temp_epochs', 30,
     'README Boosting DINO performance: --warmup_teacher_temp_epochs 30'),
    ('model.norm_last_layer', False, 'README Boosting DINO performance: --norm_last_layer false'),
]

# The one kldino choice: the teacher's normalisation (DINO: centering).
KLDINO_ONLY = {'objective.normalization': 'prior'}


def get(config, key):
  for part in key.split('.'):
    config = config[part]
  return tuple(config) if isinstance(config, (list, tuple)) else config


def flat(config, prefix=''):
  items = {}
  for name, value in config.items():
    if hasattr(value, 'items'):
      items.update(flat(value, f'{prefix}{name}.'))
    else:
      items[f'{prefix}{name}'] = tuple(value) if isinstance(value, (list, tuple)) else value
  return items


@pytest.fixture(scope='module')
def recipe():
  return config_module('imagenet_vit_s16').get_config()


@pytest.fixture(scope='module')
def boost():
  return config_module('imagenet_vit_s16_boost').get_config()


def test_the_table_has_one_row_per_key():
  keys = [key for key, _, _ in OFFICIAL]
  assert len(keys) == len(set(keys))
  assert {key for key, _, _ in BOOST} <= set(keys)


@pytest.mark.parametrize('key, value, source', OFFICIAL, ids=[row[0] for row in OFFICIAL])
def test_recipe_value_is_dinos(recipe, key, value, source):
  assert get(recipe, key) == value, f'{key}: DINO has {value!r} ({source})'


def test_recipe_keeps_the_prior_and_center_gives_dino(recipe):
  for key, value in KLDINO_ONLY.items():
    assert get(recipe, key) == value
  validate_config(recipe, num_devices=8)
  dino = config_module('imagenet_vit_s16').get_config()
  dino.objective.normalization = 'center'
  assert objective.get_normalization(dino.objective) is not None
  validate_config(dino, num_devices=8)
  assert 'normalization=center' in config_module('imagenet_vit_s16').__doc__


def test_recipe_schedules_are_dinos(recipe):
  scheds = schedules.make_schedules(recipe, STEPS_PER_EPOCH)
  total = 100 * STEPS_PER_EPOCH
  # lr: 5e-4 x 512 / 256 after 10 warmup epochs, cosine to 1e-6.
  assert float(scheds.learning_rate(0)) == 0.0
  assert float(scheds.learning_rate(10 * STEPS_PER_EPOCH)) == pytest.approx(1e-3, rel=1e-6)
  assert float(scheds.learning_rate(total)) == pytest.approx(1e-6, rel=1e-3)
  # The teacher temperature is 0.04 throughout: no 0.07, no warmup.
  for step in (0, 15 * STEPS_PER_EPOCH, 30 * STEPS_PER_EPOCH, total - 1):
    assert float(scheds.teacher_temp(step)) == pytest.approx(0.04)
  assert float(scheds.weight_decay(0)) == pytest.approx(0.04)
  assert float(scheds.weight_decay(total)) == pytest.approx(0.4)
  assert float(scheds.teacher_momentum(0)) == pytest.approx(0.996)
  assert float(scheds.teacher_momentum(total)) == pytest.approx(1.0)


@pytest.mark.parametrize('key, value, source', BOOST, ids=[row[0] for row in BOOST])
def test_boost_value_is_dinos(boost, key, value, source):
  assert get(boost, key) == value, f'{key}: DINO\'s boosted run has {value!r} ({source})'


def test_boost_changes_nothing_else(recipe, boost):
  base, boosted = flat(recipe), flat(boost)
  assert base.keys() == boosted.keys()
  changed = {key for key in base if base[key] != boosted[key]}
  assert changed == {key for key, _, _ in BOOST}
  validate_config(boost, num_devices=8)


def test_boost_schedules(boost):
  steps_per_epoch = 1_281_167 // 1024
  scheds = schedules.make_schedules(boost, steps_per_epoch)
  assert float(scheds.learning_rate(10 * steps_per_epoch)) == pytest.approx(2e-3, rel=1e-6)
  assert float(scheds.teacher_temp(0)) == pytest.approx(0.04)
  # DINO's np.linspace(0.04, 0.07, 30)[epoch], constant within an epoch, 0.07 from epoch 29.
  for epoch in (1, 15, 29):
    expected = np.linspace(0.04, 0.07, 30)[epoch]
    for step in (epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1):
      assert float(scheds.teacher_temp(step)) == pytest.approx(expected, rel=1e-6)
  assert float(scheds.teacher_temp(30 * steps_per_epoch)) == pytest.approx(0.07)
  assert float(scheds.teacher_temp(300 * steps_per_epoch - 1)) == pytest.approx(0.07)


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
  graphdef, abstract_params = step_lib.build_graphdef(config, in_channels=3)
  backbone_size = sum(x.size for x in jax.tree.leaves(abstract_params['backbone']))
  assert 21.5e6 < backbone_size < 22.0e6, backbone_size  # ViT-S/16: 21.7M
  abstract_state = jax.eval_shape(step_lib.make_init_fn(config, 3, optimizer), 0)
  batch = {
      'global_crops': jax.ShapeDtypeStruct((config.batch_size, 2, 224, 224, 3), 'float32'),
      'local_crops': jax.ShapeDtypeStruct((config.batch_size, 8, 96, 96, 3), 'float32'),
  }
  train_step = step_lib.make_train_step(graphdef, config, scheds, optimizer)
  new_state, metrics = jax.eval_shape(train_step, abstract_state, batch)
  assert jax.tree.map(lambda x: (x.shape, x.dtype),
                      new_state) == jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
  assert new_state.norm_state['log_prior'].shape == (65536,)
  assert metrics['loss'].shape == ()
  # The schedules of the recipe: peak lr scaled by batch / 256, tau_t 0.04 throughout.
  assert abs(float(scheds.learning_rate(10 * steps_per_epoch)) - 1e-3) < 1e-6
  assert abs(float(scheds.teacher_temp(30 * steps_per_epoch)) - 0.04) < 1e-7
