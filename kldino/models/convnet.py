"""Residual CNNs with GroupNorm: `convnet_small` for CPU runs, `resnet18` / `resnet50`.

GroupNorm, not BatchNorm: a backbone feature must not depend on which other images share the
batch (teacher, student, prior pass and evaluation see different batches). Every network ends with
global average pooling and a LayerNorm, so its feature plays the role of the ViT's normed CLS.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kldino.models.layers import drop_path, linear_drop_rates, run_blocks
from kldino.models.registry import register_backbone

# He init (fan_out) for convolutions followed by a norm and ReLU, as in torchvision.
_conv_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(in_width: int, out_width: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  # No bias: every convolution is followed by a norm that has one.
  return nnx.Conv(in_width,
                  out_width,
                  kernel_size=(kernel, kernel),
                  strides=(stride, stride),
                  padding=kernel // 2,
                  use_bias=False,
                  kernel_init=_conv_init,
                  rngs=rngs)


class ConvNorm(nnx.Module):

  def __init__(self, in_width: int, out_width: int, kernel: int, stride: int, groups: int, *,
               rngs: nnx.Rngs):
    self.conv = _conv(in_width, out_width, kernel, stride, rngs)
    self.norm = nnx.GroupNorm(out_width, num_groups=groups, epsilon=1e-5, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class ResidualBlock(nnx.Module):
  """relu(shortcut(x) + drop_path(branch(x))) with a basic (3x3, 3x3) or bottleneck branch
  (1x1, 3x3 strided, 1x1 to 4x width); the shortcut is a strided 1x1 ConvNorm when shapes change.
  """

  def __init__(self, in_width: int, width: int, stride: int, *, bottleneck: bool, groups: int,
               drop_rate: float, rngs: nnx.Rngs):
    if bottleneck:
      shapes = [(in_width, width, 1, 1), (width, width, 3, stride), (width, 4 * width, 1, 1)]
    else:
      shapes = [(in_width, width, 3, stride), (width, width, 3, 1)]
    self.branch = nnx.List([ConvNorm(*shape, groups, rngs=rngs) for shape in shapes])
    out_width = shapes[-1][1]
    self.out_width = out_width
    needs_projection = stride != 1 or in_width != out_width
    self.shortcut = (ConvNorm(in_width, out_width, 1, stride, groups, rngs=rngs)
                     if needs_projection else None)
    self.drop_rate = drop_rate

  def __call__(self, x: jax.Array, *, drop_key: jax.Array | None = None) -> jax.Array:
    branch = x
    for index, layer in enumerate(self.branch):
      branch = layer(branch)
      if index < len(self.branch) - 1:
        branch = jax.nn.relu(branch)
    shortcut = x if self.shortcut is None else self.shortcut(x)
    return jax.nn.relu(shortcut + drop_path(branch, self.drop_rate, drop_key))


class ResNet(nnx.Module):
  """images [B, H, W, C] -> [B, num_features]: stem, residual stages, mean pool, LayerNorm.

  `large_stem` is ImageNet's 7x7/2 convolution and 3x3/2 max pool; without it the stem is one
  3x3/1 convolution, which keeps the resolution of 16x16 images and 8x8 local crops.
  """

  def __init__(self,
               *,
               widths,
               depths,
               strides,
               bottleneck: bool,
               large_stem: bool,
               groups: int,
               drop_path_rate: float = 0.0,
               in_channels: int,
               remat: bool = False,
               model_name: str = 'ResNet',
               rngs: nnx.Rngs):
    self.model_name = model_name
    self.in_channels = in_channels
    self.large_stem = large_stem
    self.remat = remat
    stem_width = 64 if large_stem else widths[0]
    self.stem = ConvNorm(in_channels,
                         stem_width,
                         7 if large_stem else 3,
                         2 if large_stem else 1,
                         groups,
                         rngs=rngs)
    rates = iter(linear_drop_rates(drop_path_rate, sum(depths)))
    blocks, in_width = [], stem_width
    for width, depth, stride in zip(widths, depths, strides):
      for index in range(depth):
        block = ResidualBlock(in_width,
                              width,
                              stride if index == 0 else 1,
                              bottleneck=bottleneck,
                              groups=groups,
                              drop_rate=next(rates),
                              rngs=rngs)
        blocks.append(block)
        in_width = block.out_width
    self.blocks = nnx.List(blocks)
    self.num_features = in_width
    self.norm = nnx.LayerNorm(in_width, epsilon=1e-6, rngs=rngs)

  def __call__(self, images: jax.Array, *, drop_key: jax.Array | None = None) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f'ResNet expects images [B, H, W, {self.in_channels}], got shape '
                       f'{images.shape}: pass channels-last images')
    x = jax.nn.relu(self.stem(images))
    if self.large_stem:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = run_blocks(self.blocks, x, drop_key, remat=self.remat)
    return self.norm(jnp.mean(x, axis=(1, 2)))

  def _check_feature_options(self, n_last_blocks: int, avgpool_patchtokens: bool):
    if n_last_blocks != 1 or avgpool_patchtokens:
      raise ValueError(
          'eval.n_last_blocks / eval.avgpool_patchtokens apply to ViTs only: model '
          f'{self.model_name} has one pooled feature, got n_last_blocks={n_last_blocks!r}, '
          f'avgpool_patchtokens={avgpool_patchtokens!r}: set eval.n_last_blocks=1 and '
          'eval.avgpool_patchtokens=False')

  def feature_dim(self, n_last_blocks: int = 1, avgpool_patchtokens: bool = False) -> int:
    """The width of `features(...)`: num_features (only the ViT options' defaults apply)."""
    self._check_feature_options(n_last_blocks, avgpool_patchtokens)
    return self.num_features

  def features(self,
               images: jax.Array,
               *,
               n_last_blocks: int = 1,
               avgpool_patchtokens: bool = False) -> jax.Array:
    """The evaluation feature, `__call__`'s; the ViT options must keep their defaults."""
    self._check_feature_options(n_last_blocks, avgpool_patchtokens)
    return self(images)


CONVNET_SIZES = {
    # ~0.69M parameters; 16x16 -> 16, 8, 4 (8x8 local crops -> 8, 4, 2).
    'convnet_small':
        dict(widths=(32, 64, 128),
             depths=(2, 2, 2),
             strides=(1, 2, 2),
             bottleneck=False,
             large_stem=False,
             groups=8),
    'resnet18':
        dict(widths=(64, 128, 256, 512),
             depths=(2, 2, 2, 2),
             strides=(1, 2, 2, 2),
             bottleneck=False,
             large_stem=True,
             groups=32),
    'resnet50':
        dict(widths=(64, 128, 256, 512),
             depths=(3, 4, 6, 3),
             strides=(1, 2, 2, 2),
             bottleneck=True,
             large_stem=True,
             groups=32),
}


def _register_convnet(name: str, size: dict):

  @register_backbone(name)
  def build(model_config, *, in_channels, image_size, rngs):
    del image_size  # convolutions take any size
    return ResNet(drop_path_rate=model_config.drop_path,
                  in_channels=in_channels,
                  remat=model_config.remat,
                  model_name=name,
                  rngs=rngs,
                  **size)


for _name, _size in CONVNET_SIZES.items():
  _register_convnet(_name, _size)
