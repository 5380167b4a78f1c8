"""Config names -> backbones, and the student/teacher model (backbone + DINO head).

Backbone modules register their sizes with `@register_backbone(name)`; importing
`kldino.models` imports them all, so the registry is full before anyone builds a model.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from flax import nnx

from kldino.models.head import DINOHead, HEAD_INITS, HEAD_NORMS, PROTOTYPE_MODES
from kldino.registry import Registry


class BackboneEntry(NamedTuple):
  # build(model_config, *, in_channels, image_size, rngs) -> module with
  # __call__(images, *, drop_key=None) -> [B, num_features] and attribute num_features.
  build: Callable[..., nnx.Module]
  uses_patches: bool  # whether model.patch_size must divide the image sizes
  validate: Callable | None  # model_config -> None, ValueError naming a bad option of the kind


BACKBONES = Registry('backbone', key='model.name')  # name -> BackboneEntry


def register_backbone(name: str, *, uses_patches: bool = False, validate: Callable | None = None):

  def register(build):
    BACKBONES.register(name)(BackboneEntry(build, uses_patches, validate))
    return build

  return register


def _backbone_entry(name: str) -> BackboneEntry:
  return BACKBONES.get(name)


def _require(condition: bool, message: str):
  if not condition:
    raise ValueError(message)


def _head_options(model_config) -> dict:
  return dict(init=model_config.head_init,
              prototype_init_std=float(model_config.prototype_init_std),
              norm_last_layer=bool(model_config.norm_last_layer))


def validate_model_config(model_config, *, image_sizes=()):
  """The cheap checks of `config.model`, without building anything; one line per problem."""
  entry = _backbone_entry(model_config.name)
  _require(model_config.num_prototypes >= 2,
           f'model.num_prototypes={model_config.num_prototypes} must be >= 2')
  _require(
      model_config.head_norm in HEAD_NORMS,
      f"unknown model.head_norm '{model_config.head_norm}': choose one of "
      f"{', '.join(HEAD_NORMS)}")
  _require(
      model_config.prototypes in PROTOTYPE_MODES,
      f"unknown model.prototypes '{model_config.prototypes}': choose one of "
      f"{', '.join(PROTOTYPE_MODES)}")
  _require(model_config.head_num_layers >= 1,
           f'model.head_num_layers={model_config.head_num_layers} must be >= 1')
  head = _head_options(model_config)
  _require(head['init'] in HEAD_INITS,
           f"unknown model.head_init '{head['init']}': choose one of {', '.join(HEAD_INITS)}")
  _require(
      head['prototype_init_std'] >= 0,
      f"model.prototype_init_std={head['prototype_init_std']} must be 0 (DINO's uniform "
      '+-1/sqrt(bottleneck)) or the std (> 0) of a normal init')
  _require(
      head['norm_last_layer'] or model_config.prototypes == 'learned',
      "model.norm_last_layer=False (a learned gain per prototype) needs "
      f"model.prototypes='learned', not '{model_config.prototypes}': 'fixed' prototypes "
      "must not change and 'centered' ones must stay unit vectors")
  compute_dtype = model_config.compute_dtype
  _require(
      compute_dtype in COMPUTE_DTYPES,
      f"unknown model.compute_dtype '{compute_dtype}': choose one of "
      f"{', '.join(COMPUTE_DTYPES)}")
  _require(0.0 <= model_config.drop_path < 1.0,
           f'model.drop_path={model_config.drop_path} must be in [0, 1)')
  if entry.validate is not None:
    entry.validate(model_config)
  if entry.uses_patches:
    patch_size = model_config.patch_size
    _require(patch_size >= 1, f'model.patch_size={patch_size} must be >= 1')
    for size in image_sizes:
      _require(
          size % patch_size == 0,
          f'image size {size} is not a multiple of model.patch_size={patch_size}: '
          'change the crop sizes or the patch size')


def build_backbone(model_config, *, in_channels: int, image_size: int, rngs: nnx.Rngs):
  return _backbone_entry(model_config.name).build(model_config,
                                                  in_channels=in_channels,
                                                  image_size=image_size,
                                                  rngs=rngs)


COMPUTE_DTYPES = ('float32', 'bfloat16')


class DINOModel(nnx.Module):
  """The student (and, with EMA parameters, the teacher): `backbone` then `head`, and iBOT's
  `patch_head` for the masked patches when it is not the same head (None: `head` serves both).

  `compute_dtype` is the backbone's arithmetic (forward.py casts its parameters and images);
  parameters stay float32, and the head, the objective and the optimizer run in float32.
  """

  def __init__(self,
               backbone: nnx.Module,
               head: DINOHead,
               compute_dtype: str = 'float32',
               patch_head: DINOHead | None = None):
    self.backbone = backbone
    self.head = head
    self.patch_head = patch_head
    self.compute_dtype = compute_dtype


def build_model(model_config,
                *,
                in_channels: int,
                image_size: int,
                rngs: nnx.Rngs,
                separate_patch_head: bool = False) -> DINOModel:
  """The backbone and the DINO head; with `separate_patch_head` (objective.ibot.separate_head)
  a second head of the same shape for iBOT's patch targets."""
  validate_model_config(model_config, image_sizes=(image_size,))
  backbone = build_backbone(model_config, in_channels=in_channels, image_size=image_size, rngs=rngs)
  make_head = lambda: DINOHead(backbone.num_features,
                               hidden_dim=model_config.head_hidden_dim,
                               bottleneck_dim=model_config.head_bottleneck_dim,
                               num_layers=model_config.head_num_layers,
                               num_prototypes=model_config.num_prototypes,
                               norm=model_config.head_norm,
                               prototypes=model_config.prototypes,
                               **_head_options(model_config),
                               rngs=rngs)
  head = make_head()
  return DINOModel(backbone, head, model_config.compute_dtype,
                   make_head() if separate_patch_head else None)
