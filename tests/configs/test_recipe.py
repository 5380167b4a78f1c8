"""configs/imagenet_vit_s16.py is DINO's official ViT-S/16 100-epoch run, value by value,
configs/imagenet_vit_s16_boost.py its README's "boosted" 300-epoch run, and
configs/imagenet_dinov2_vitl16.py DINOv2's ImageNet-1k ViT-L/16 run (DINOV2 below); the recipes'
train steps build abstractly at full size.

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


# DINOv2's ImageNet-1k run: facebookresearch/dinov2's dinov2/configs/train/vitl16_short.yaml on
# dinov2/configs/ssl_default_config.yaml (SSL below), 32 GPUs (README: ViT-L/16 on ImageNet-1k).
# Its epochs are OFFICIAL_EPOCH_LENGTH = 1250 iterations at batch 2048: two ImageNet epochs.
SSL = 'ssl_default_config.yaml'
DINOV2 = [
    ('num_epochs', 200, f'{SSL} optim.epochs 100 x train.OFFICIAL_EPOCH_LENGTH 1250 iterations'),
    ('batch_size', 2048, f'{SSL} train.batch_size_per_gpu 64 x 32 GPUs'),
    ('aug.global_size', 224, f'{SSL} crops.global_crops_size'),
    ('aug.local_size', 96, f'{SSL} crops.local_crops_size'),
    ('aug.num_local', 8, f'{SSL} crops.local_crops_number'),
    ('aug.global_scale', (0.32, 1.0), f'{SSL} crops.global_crops_scale'),
    ('aug.local_scale', (0.05, 0.32), f'{SSL} crops.local_crops_scale'),
    ('model.name', 'vit_large', f'{SSL} student.arch'),
    ('model.patch_size', 16, f'{SSL} student.patch_size'),
    ('model.drop_path', 0.3, f'{SSL} student.drop_path_rate'),
    ('model.drop_path_uniform', True, f'{SSL} student.drop_path_uniform'),
    ('model.layerscale', 1e-5, f'{SSL} student.layerscale'),
    ('model.ffn', 'mlp', f'{SSL} student.ffn_layer'),
    ('model.num_registers', 0, f'{SSL} student.num_register_tokens'),
    ('model.interpolate_offset', 0.1, f'{SSL} student.interpolate_offset'),
    ('model.interpolate_antialias', False, f'{SSL} student.interpolate_antialias'),
    ('model.pos_interpolation', 'torch', 'vision_transformer.py interpolate_pos_encoding'),
    ('model.num_prototypes', 65536, f'{SSL} dino.head_n_prototypes'),
    ('model.head_bottleneck_dim', 256, f'{SSL} dino.head_bottleneck_dim'),
    ('model.head_hidden_dim', 2048, f'{SSL} dino.head_hidden_dim'),
    ('model.head_num_layers', 3, f'{SSL} dino.head_nlayers'),
    ('model.head_norm', 'none', 'layers/dino_head.py DINOHead use_bn=False'),
    ('model.head_init', 'dino', 'layers/dino_head.py DINOHead._init_weights trunc_normal_ .02'),
    ('model.norm_last_layer', False, 'layers/dino_head.py last_layer weight_g trained'),
    ('objective.ibot.loss_weight', 1.0, f'{SSL} ibot.loss_weight'),
    ('objective.ibot.separate_head', False, f'{SSL} ibot.separate_head'),
    ('objective.ibot.mask_sample_probability', 0.5, f'{SSL} ibot.mask_sample_probability'),
    ('objective.ibot.mask_ratio_min_max', (0.1, 0.5), f'{SSL} ibot.mask_ratio_min_max'),
    ('objective.koleo_weight', 0.1, f'{SSL} dino.koleo_loss_weight'),
    ('objective.koleo_group_size', 64, 'train/ssl_meta_arch.py: KoLeo on each GPU\'s 64 images'),
    ('objective.student_temp', 0.1, 'loss/dino_clstoken_loss.py student_temp'),
    ('objective.warmup_teacher_temp', 0.04, f'{SSL} teacher.warmup_teacher_temp'),
    ('objective.teacher_temp', 0.07, f'{SSL} teacher.teacher_temp'),
    ('objective.warmup_teacher_temp_epochs', 60, f'{SSL} teacher.warmup_teacher_temp_epochs 30'),
    ('objective.teacher_temp_warmup', 'per_step', 'train/train.py CosineScheduler warmup_iters'),
    ('objective.center_momentum', 0.9, 'loss/dino_clstoken_loss.py center_momentum'),
    ('optim.teacher_momentum', 0.992, f'{SSL} teacher.momentum_teacher'),
    ('optim.teacher_momentum_end', 1.0, f'{SSL} teacher.final_momentum_teacher'),
    ('optim.lr', 4e-3, f'{SSL} optim.base_lr (for a batch of 1024)'),
    ('optim.lr_scaling', 'sqrt_wrt_1024', f'{SSL} optim.scaling_rule'),
    ('optim.min_lr', 1e-6, f'{SSL} optim.min_lr'),
    ('optim.warmup_epochs', 20, f'{SSL} optim.warmup_epochs 10'),
    ('optim.weight_decay', 0.04, f'{SSL} optim.weight_decay'),
    ('optim.weight_decay_end', 0.4, f'{SSL} optim.weight_decay_end'),
    ('optim.clip_grad', 3.0, f'{SSL} optim.clip_grad'),
    ('optim.clip_mode', 'per_module', 'train/train.py: clip_grad_norm_ of each student module'),
    ('optim.freeze_prototypes_epochs', 2, f'{SSL} optim.freeze_last_layer_epochs 1'),
    ('optim.layerwise_decay', 0.9, f'{SSL} optim.layerwise_decay'),
    ('optim.patch_embed_lr_mult', 0.2, f'{SSL} optim.patch_embed_lr_mult'),
    ('eval.knn_k', (10, 20, 100, 200), 'eval/knn.py nb_knn'),
    ('eval.knn_temperature', 0.07, 'eval/knn.py temperature'),
    ('eval.linear_lrs', (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2,
                         1e-1), 'eval/linear.py learning_rates'),
]
# The kldino choice: the prior on image and patch targets (DINOv2: centering, or Sinkhorn-Knopp).
DINOV2_KLDINO_ONLY = {
    'objective.normalization': 'prior',
    'objective.patch_normalization': 'prior',
}


@pytest.fixture(scope='module')
def dinov2():
  return config_module('imagenet_dinov2_vitl16').get_config()


@pytest.mark.parametrize('key, value, source', DINOV2, ids=[row[0] for row in DINOV2])
def test_dinov2_recipe_value_is_dinov2s(dinov2, key, value, source):
  assert get(dinov2, key) == value, f'{key}: DINOv2 has {value!r} ({source})'


def test_dinov2_recipe_checks_and_its_schedules_are_dinov2s(dinov2):
  assert len({key for key, _, _ in DINOV2}) == len(DINOV2)
  for key, value in DINOV2_KLDINO_ONLY.items():
    assert get(dinov2, key) == value
  validate_config(dinov2, num_devices=32)
  steps_per_epoch = 1_281_167 // 2048  # 625: two of them make DINOv2's epoch of 1250
  scheds = schedules.make_schedules(dinov2, steps_per_epoch)
  total = 200 * steps_per_epoch
  assert total == 100 * 1250
  # lr: 4e-3 x sqrt(2048 / 1024) after 10 DINOv2 epochs (12500 iterations), cosine to 1e-6.
  assert float(scheds.learning_rate(12_500)) == pytest.approx(4e-3 * np.sqrt(2), rel=1e-6)
  assert float(scheds.learning_rate(total)) == pytest.approx(1e-6, rel=1e-3)
  # The teacher temperature: np.linspace(0.04, 0.07, 30 x 1250) over the first iterations.
  for step in (0, 1000, 37_499):
    assert float(scheds.teacher_temp(step)) == pytest.approx(np.linspace(0.04, 0.07, 37_500)[step])
  assert float(scheds.teacher_temp(37_500)) == pytest.approx(0.07)
  assert float(scheds.teacher_momentum(0)) == pytest.approx(0.992)


def test_dinov2_recipe_builds_abstractly(dinov2):
  """ViT-L/16 (303 M backbone parameters) with iBOT, KoLeo and both priors: one train step
  traced on abstract arrays keeps the state's shapes."""
  config = dinov2.copy_and_resolve_references()
  config.batch_size = 64  # the trace's shapes, not the recipe's
  config.objective.koleo_group_size = 32
  scheds = schedules.make_schedules(config, 625)
  optimizer = optim.make_optimizer(config.optim, scheds)
  graphdef, abstract_params = step_lib.build_graphdef(config, in_channels=3)
  backbone_size = sum(x.size for x in jax.tree.leaves(abstract_params['backbone']))
  assert 303.2e6 < backbone_size < 303.5e6, backbone_size  # ViT-L/16 without a classifier: 303.3M
  abstract_state = jax.eval_shape(step_lib.make_init_fn(config, 3, optimizer), 0)
  batch = {
      'global_crops': jax.ShapeDtypeStruct((64, 2, 224, 224, 3), 'float32'),
      'local_crops': jax.ShapeDtypeStruct((64, 8, 96, 96, 3), 'float32'),
      'masks': jax.ShapeDtypeStruct((64, 2, 196), 'bool'),
  }
  train_step = step_lib.make_train_step(graphdef, config, scheds, optimizer)
  new_state, metrics = jax.eval_shape(train_step, abstract_state, batch)
  assert jax.tree.map(lambda x: (x.shape, x.dtype),
                      new_state) == jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
  assert new_state.norm_state['patch']['log_prior'].shape == (65536,)
  assert {'ibot_loss', 'koleo_loss', 'patch_teacher_entropy'} <= set(metrics)


# DINOv3's ImageNet-1k run: facebookresearch/dinov3's dinov3/configs/train/vitl_im1k_lin834.yaml
# (LIN834 below), 64 images on each of 32 GPUs; its epochs are OFFICIAL_EPOCH_LENGTH 1250
# iterations at batch 2048, two ImageNet epochs.
LIN834 = 'vitl_im1k_lin834.yaml'
DINOV3 = [
    ('num_epochs', 200, f'{LIN834} optim.epochs 100 x train.OFFICIAL_EPOCH_LENGTH 1250'),
    ('batch_size', 2048, f'{LIN834} train.batch_size_per_gpu 64 x 32 GPUs'),
    ('aug.global_size', 224, f'{LIN834} crops.global_crops_size'),
    ('aug.local_size', 96, f'{LIN834} crops.local_crops_size'),
    ('aug.num_local', 8, f'{LIN834} crops.local_crops_number'),
    ('aug.global_scale', (0.32, 1.0), f'{LIN834} crops.global_crops_scale'),
    ('aug.local_scale', (0.05, 0.32), f'{LIN834} crops.local_crops_scale'),
    ('model.name', 'vit_large', f'{LIN834} student.arch'),
    ('model.patch_size', 16, f'{LIN834} student.patch_size'),
    ('model.drop_path', 0.3, f'{LIN834} student.drop_path_rate'),
    ('model.drop_path_uniform', True, 'models/vision_transformer.py: drop_path_rate in each block'),
    ('model.layerscale', 1e-5, f'{LIN834} student.layerscale'),
    ('model.ffn', 'mlp', f'{LIN834} student.ffn_layer'),
    ('model.num_registers', 0, f'{LIN834} student.n_storage_tokens'),
    ('model.pos_embed', 'rope', f'{LIN834} student.pos_embed_type'),
    ('model.rope_base', 100.0, f'{LIN834} student.pos_embed_rope_base'),
    ('model.rope_normalize_coords', 'separate',
     f'{LIN834} student.pos_embed_rope_normalize_coords'),
    ('model.num_prototypes', 65536, f'{LIN834} dino.head_n_prototypes'),
    ('model.head_bottleneck_dim', 256, f'{LIN834} dino.head_bottleneck_dim'),
    ('model.head_hidden_dim', 2048, f'{LIN834} dino.head_hidden_dim'),
    ('model.head_num_layers', 3, f'{LIN834} dino.head_nlayers'),
    ('model.head_norm', 'none', 'layers/dino_head.py DINOHead'),
    ('model.norm_last_layer', False, f'{LIN834} dino.head_norm_last_layer'),
    ('model.compute_dtype', 'bfloat16', f'{LIN834} compute_precision.param_dtype bf16'),
    ('objective.normalization', 'sinkhorn', f'{LIN834} train.centering sinkhorn_knopp'),
    ('objective.patch_normalization', 'sinkhorn', f'{LIN834} train.centering sinkhorn_knopp'),
    ('objective.sinkhorn_iters', 3,
     'loss/dino_clstoken_loss.py sinkhorn_knopp_teacher n_iterations'),
    ('objective.ibot.loss_weight', 1.0, f'{LIN834} ibot.loss_weight'),
    ('objective.ibot.separate_head', True, f'{LIN834} ibot.separate_head'),
    ('objective.ibot.mask_sample_probability', 0.5, f'{LIN834} ibot.mask_sample_probability'),
    ('objective.ibot.mask_ratio_min_max', (0.1, 0.5), f'{LIN834} ibot.mask_ratio_min_max'),
    ('objective.koleo_weight', 0.1, f'{LIN834} dino.koleo_loss_weight'),
    ('objective.koleo_group_size', 64, f'{LIN834} dino.koleo_loss_distributed false: per GPU'),
    ('objective.warmup_teacher_temp', 0.04, f'{LIN834} teacher.warmup_teacher_temp'),
    ('objective.teacher_temp', 0.07, f'{LIN834} teacher.teacher_temp'),
    ('objective.warmup_teacher_temp_epochs', 60, f'{LIN834} teacher.warmup_teacher_temp_epochs 30'),
    ('objective.teacher_temp_warmup', 'per_step', 'train/train.py: per-iteration schedules'),
    ('optim.teacher_momentum', 0.992, f'{LIN834} teacher.momentum_teacher'),
    ('optim.teacher_momentum_end', 1.0, f'{LIN834} teacher.final_momentum_teacher'),
    ('optim.lr', 1e-3, f'{LIN834} optim.lr (for a batch of 1024)'),
    ('optim.lr_scaling', 'sqrt_wrt_1024', f'{LIN834} optim.scaling_rule'),
    ('optim.min_lr', 1e-6, f'{LIN834} optim.min_lr'),
    ('optim.warmup_epochs', 20, f'{LIN834} optim.warmup_epochs 10'),
    ('optim.weight_decay', 0.04, f'{LIN834} optim.weight_decay'),
    ('optim.weight_decay_end', 0.4, f'{LIN834} optim.weight_decay_end'),
    ('optim.clip_grad', 3.0, f'{LIN834} optim.clip_grad'),
    ('optim.clip_mode', 'per_module', 'train/train.py: clip_grad_norm_ of each student module'),
    ('optim.freeze_prototypes_epochs', 2, f'{LIN834} optim.freeze_last_layer_epochs 1'),
    ('optim.layerwise_decay', 0.9, f'{LIN834} optim.layerwise_decay'),
    ('optim.patch_embed_lr_mult', 0.2, f'{LIN834} optim.patch_embed_lr_mult'),
]


@pytest.fixture(scope='module')
def dinov3():
  return config_module('imagenet_dinov3_vitl16').get_config()


@pytest.mark.parametrize('key, value, source', DINOV3, ids=[row[0] for row in DINOV3])
def test_dinov3_recipe_value_is_dinov3s(dinov3, key, value, source):
  assert get(dinov3, key) == value, f'{key}: DINOv3 has {value!r} ({source})'


def test_dinov3_prior_variant_differs_in_the_normalisations_only(dinov3):
  assert len({key for key, _, _ in DINOV3}) == len(DINOV3)
  module = config_module('imagenet_dinov3_vitl16')
  prior = module.get_config('prior')
  for key, value, _ in DINOV3:
    if key.endswith('normalization'):
      assert get(prior, key) == 'prior'
    else:
      assert get(prior, key) == value, key
  validate_config(dinov3, num_devices=32)
  validate_config(prior, num_devices=32)
  with pytest.raises(ValueError, match="':prior'"):
    module.get_config('center')
