"""Vision Transformer (as in DINO): patch embedding, CLS token, pre-norm blocks, final LayerNorm."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kldino.models.layers import block_key, drop_path, gelu, linear_drop_rates, run_blocks
from kldino.models.registry import register_backbone

# DINO's init for linears and tokens: trunc_normal_(std=.02, a=-2, b=2), zero biases. Its bounds
# are absolute, +-100 std, so it never truncates: a plain normal is the same distribution.
_token_init = nnx.initializers.normal(0.02)
# DINO leaves the patch convolution at PyTorch's default; LeCun normal keeps patch tokens O(1).
_patch_init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal')
_NORM_EPS = 1e-6
VIT_STEMS = ('patch', 'conv')


def _linear(fan_in: int, fan_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(fan_in, fan_out, kernel_init=_token_init, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'dim={dim} is not divisible by num_heads={num_heads}: change either')
    self.num_heads = num_heads
    self.qkv = _linear(dim, 3 * dim, rngs)
    self.proj = _linear(dim, dim, rngs)

  def _qkv(self, tokens: jax.Array) -> jax.Array:
    batch, length, dim = tokens.shape
    # qkv features are laid out [3, heads, head_dim], as in DINO's checkpoints.
    return self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    qkv = self._qkv(tokens)
    mixed = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(mixed.reshape(tokens.shape))

  def weights(self, tokens: jax.Array) -> jax.Array:
    """The softmax attention weights [B, heads, queries, keys] that __call__ mixes with."""
    qkv = self._qkv(tokens)
    queries, keys = qkv[:, :, 0], qkv[:, :, 1]
    logits = jnp.einsum('bqhd,bkhd->bhqk', queries, keys) * queries.shape[-1]**-0.5
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class MLP(nnx.Module):

  def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden_dim, rngs)
    self.fc2 = _linear(hidden_dim, dim, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm transformer block; each residual branch has its own stochastic depth draw."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_rate: float, *,
               rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, epsilon=_NORM_EPS, rngs=rngs)
    self.attn = Attention(dim, num_heads, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=_NORM_EPS, rngs=rngs)
    self.mlp = MLP(dim, int(dim * mlp_ratio), rngs=rngs)
    self.drop_rate = drop_rate

  def __call__(self, tokens: jax.Array, *, drop_key: jax.Array | None = None) -> jax.Array:
    attn_key, mlp_key = block_key(drop_key, 0), block_key(drop_key, 1)
    tokens = tokens + drop_path(self.attn(self.norm1(tokens)), self.drop_rate, attn_key)
    return tokens + drop_path(self.mlp(self.norm2(tokens)), self.drop_rate, mlp_key)


class ConvStem(nnx.Module):
  """A convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers
  see better"): log2(patch) stride-2 3x3 convolutions with GroupNorm and GELU, then a 1x1
  projection to `dim`. It gives the same token grid as the linear patch embedding, with the
  locality prior that small datasets lack the data to learn.
  """

  def __init__(self, in_channels: int, dim: int, patch_size: int, *, rngs: nnx.Rngs):
    num_convs = patch_size.bit_length() - 1
    if patch_size != 2**num_convs or num_convs < 1:
      raise ValueError(f'a conv stem needs a power-of-two patch_size >= 2, got {patch_size}: '
                       "change model.patch_size or use model.stem='patch'")
    widths = [in_channels] + [dim // 2**(num_convs - i) for i in range(num_convs)]
    self.convs = nnx.List([
        nnx.Conv(fan_in,
                 fan_out,
                 kernel_size=(3, 3),
                 strides=(2, 2),
                 padding='SAME',
                 use_bias=False,
                 rngs=rngs) for fan_in, fan_out in zip(widths[:-1], widths[1:])
    ])
    self.norms = nnx.List(
        [nnx.GroupNorm(width, num_groups=min(8, width), rngs=rngs) for width in widths[1:]])
    self.project = nnx.Conv(widths[-1], dim, kernel_size=(1, 1), rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images
    for conv, norm in zip(self.convs, self.norms):
      x = gelu(norm(conv(x)))
    return self.project(x)


class ViT(nnx.Module):
  """images [B, H, W, C] -> CLS token after the final LayerNorm [B, dim].

  Position embeddings are learned for the (image_size / patch_size)^2 grid and resized
  bicubically to other grids (local crops); the CLS position is kept as is.
  """

  def __init__(self,
               *,
               patch_size: int,
               dim: int,
               depth: int,
               num_heads: int,
               mlp_ratio: float = 4.0,
               drop_path_rate: float = 0.0,
               in_channels: int,
               image_size: int,
               stem: str = 'patch',
               remat: bool = False,
               rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f'image_size={image_size} is not a multiple of patch_size={patch_size}: '
                       'change the crop size or model.patch_size')
    self.patch_size = patch_size
    self.in_channels = in_channels
    self.grid_size = image_size // patch_size
    self.num_features = dim
    self.remat = remat
    if stem not in VIT_STEMS:
      raise ValueError(f"unknown ViT stem '{stem}': choose one of {', '.join(VIT_STEMS)}")
    if stem == 'conv':
      self.patch_embed = ConvStem(in_channels, dim, patch_size, rngs=rngs)
    else:
      self.patch_embed = nnx.Conv(in_channels,
                                  dim,
                                  kernel_size=(patch_size, patch_size),
                                  strides=(patch_size,) * 2,
                                  padding='VALID',
                                  kernel_init=_patch_init,
                                  rngs=rngs)
    self.cls_token = nnx.Param(_token_init(rngs.params(), (1, 1, dim)))
    self.pos_embed = nnx.Param(_token_init(rngs.params(), (1, 1 + self.grid_size**2, dim)))
    self.blocks = nnx.List([
        Block(dim, num_heads, mlp_ratio, rate, rngs=rngs)
        for rate in linear_drop_rates(drop_path_rate, depth)
    ])
    self.norm = nnx.LayerNorm(dim, epsilon=_NORM_EPS, rngs=rngs)

  def position_embedding(self, grid_height: int, grid_width: int) -> jax.Array:
    """[1, 1 + h * w, dim]: the learned table, bicubically resized when the grid differs."""
    table = self.pos_embed[...]
    if (grid_height, grid_width) == (self.grid_size, self.grid_size):
      return table
    cls_position, patch_positions = table[:, :1], table[0, 1:]
    grid = patch_positions.reshape(self.grid_size, self.grid_size, -1)
    # No antialiasing (as DINO): a pure interpolation of the learned table, also when shrinking.
    resized = jax.image.resize(grid, (grid_height, grid_width, grid.shape[-1]),
                               method='bicubic',
                               antialias=False)
    return jnp.concatenate([cls_position, resized.reshape(1, -1, grid.shape[-1])], axis=1)

  def _check_images(self, images: jax.Array):
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f'ViT expects images [B, H, W, {self.in_channels}], got shape '
                       f'{images.shape}: pass channels-last images')
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f'image size {height}x{width} is not a multiple of patch_size='
                       f'{self.patch_size}: resize or crop the images to a multiple')

  def _embed(self, images: jax.Array) -> jax.Array:
    """images -> tokens [B, 1 + h * w, dim] entering the first block (CLS first)."""
    self._check_images(images)
    patches = self.patch_embed(images)
    batch, grid_height, grid_width, dim = patches.shape
    cls_tokens = jnp.broadcast_to(self.cls_token[...], (batch, 1, dim))
    tokens = jnp.concatenate([cls_tokens, patches.reshape(batch, -1, dim)], axis=1)
    return tokens + self.position_embedding(grid_height, grid_width)

  def block_outputs(self, images: jax.Array) -> list[jax.Array]:
    """The token sequences [B, 1 + h * w, dim] after each block, first block first, before the
    final norm (deterministic: no stochastic depth)."""
    tokens = self._embed(images)
    outputs = []
    for block in self.blocks:
      tokens = block(tokens)
      outputs.append(tokens)
    return outputs

  def cls_attention(self, images: jax.Array) -> jax.Array:
    """The last block's self-attention from the CLS token to every patch, per head:
    [B, heads, h * w] float32, as DINO's get_last_selfattention()[:, :, 0, 1:]."""
    tokens = self._embed(images)
    for block in self.blocks[:-1]:
      tokens = block(tokens)
    last = self.blocks[-1]
    return last.attn.weights(last.norm1(tokens))[:, :, 0, 1:]

  def __call__(self, images: jax.Array, *, drop_key: jax.Array | None = None) -> jax.Array:
    tokens = run_blocks(self.blocks, self._embed(images), drop_key, remat=self.remat)
    # The final norm is per token, so normalising only the CLS token gives the same result.
    return self.norm(tokens[:, 0])

  def _check_feature_options(self, n_last_blocks: int, avgpool_patchtokens: bool):
    depth = len(self.blocks)
    if isinstance(n_last_blocks,
                  bool) or not isinstance(n_last_blocks, int) or not (1 <= n_last_blocks <= depth):
      raise ValueError(f'eval.n_last_blocks={n_last_blocks!r} must be an integer from 1 to the '
                       f'ViT depth {depth}: change eval.n_last_blocks')
    if avgpool_patchtokens and n_last_blocks != 1:
      raise ValueError(f'eval.avgpool_patchtokens=True needs eval.n_last_blocks=1 (as DINO), got '
                       f'{n_last_blocks}: set eval.n_last_blocks=1 or '
                       'eval.avgpool_patchtokens=False')

  def feature_dim(self, n_last_blocks: int = 1, avgpool_patchtokens: bool = False) -> int:
    """The width of `features(...)` with these options, without running the model."""
    self._check_feature_options(n_last_blocks, avgpool_patchtokens)
    return n_last_blocks * self.num_features * (2 if avgpool_patchtokens else 1)

  def features(self,
               images: jax.Array,
               *,
               n_last_blocks: int = 1,
               avgpool_patchtokens: bool = False) -> jax.Array:
    """DINO's linear-evaluation feature [B, feature_dim(...)].

    The CLS tokens of the last `n_last_blocks` blocks, each through the final norm, concatenated
    earliest block first. With `avgpool_patchtokens` (n_last_blocks 1) the normed CLS and the
    mean of the normed patch tokens are interleaved: [cls_0, avg_0, cls_1, avg_1, ...].
    (1, False) is `__call__`'s feature.
    """
    self._check_feature_options(n_last_blocks, avgpool_patchtokens)
    if n_last_blocks == 1 and not avgpool_patchtokens:
      return self(images)
    last = self.block_outputs(images)[-n_last_blocks:]
    if not avgpool_patchtokens:
      return jnp.concatenate([self.norm(tokens[:, 0]) for tokens in last], axis=-1)
    normed = self.norm(last[-1])
    pooled = jnp.stack([normed[:, 0], jnp.mean(normed[:, 1:], axis=1)], axis=-1)
    return pooled.reshape(normed.shape[0], -1)


VIT_SIZES = {
    # vit_nano: the smallest ViT with every code path, for smoke runs and fast tests.
    'vit_nano': dict(dim=32, depth=2, num_heads=2),
    'vit_micro': dict(dim=128, depth=4, num_heads=4),
    'vit_tiny': dict(dim=192, depth=12, num_heads=3),
    'vit_small': dict(dim=384, depth=12, num_heads=6),
    'vit_base': dict(dim=768, depth=12, num_heads=12),
    'vit_large': dict(dim=1024, depth=24, num_heads=16),
}


def _register_vit(name: str, size: dict):

  @register_backbone(name, uses_patches=True)
  def build(*, patch_size, drop_path_rate, in_channels, image_size, stem, remat, rngs):
    return ViT(patch_size=patch_size,
               drop_path_rate=drop_path_rate,
               in_channels=in_channels,
               remat=remat,
               image_size=image_size,
               stem=stem,
               rngs=rngs,
               **size)


for _name, _size in VIT_SIZES.items():
  _register_vit(_name, _size)
