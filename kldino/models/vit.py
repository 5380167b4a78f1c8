"""Vision Transformer (as in DINO): patch embedding, CLS token, pre-norm blocks, final LayerNorm;
with DINOv2's options (dinov2/models/vision_transformer.py): LayerScale, the SwiGLU feed-forward,
register tokens, a mask token for masked patches, and PyTorch's interpolation of the position
embeddings with DINOv2's offset and antialiasing; and DINOv3's (dinov3/models/
vision_transformer.py): rotary position embeddings instead of the table (kldino/models/rope.py),
the masked key bias, the LayerNorm epsilon and the feed-forward ratio."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kldino.models.layers import (block_key, drop_path, gelu, linear_drop_rates, run_blocks,
                                  torch_resize_matrix)
from kldino.models.registry import register_backbone
from kldino.models.rope import (NORMALIZE_COORDS, RopeOptions, augment_coords, patch_coords,
                                rope_periods, rotate, sin_cos)

# DINO's init for linears and tokens: trunc_normal_(std=.02, a=-2, b=2), zero biases. Its bounds
# are absolute, +-100 std, so it never truncates: a plain normal is the same distribution.
_token_init = nnx.initializers.normal(0.02)
# DINO leaves the patch convolution at PyTorch's default; LeCun normal keeps patch tokens O(1).
_patch_init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal')
_NORM_EPS = 1e-6
VIT_STEMS = ('patch', 'conv')
FFNS = ('mlp', 'swiglu')
# model.pos_interpolation: 'jax' resizes the position table with jax.image's bicubic (Keys a = -0.5,
# by sizes); 'torch' as torch.nn.functional.interpolate does in DINO and DINOv2 (a = -0.75, by the
# scale factor of model.interpolate_offset, and model.interpolate_antialias).
POS_INTERPOLATIONS = ('jax', 'torch')
# model.pos_embed: DINO's and DINOv2's learned table added to the tokens, or DINOv3's RoPE.
POS_EMBEDS = ('learned', 'rope')


def _linear(fan_in: int, fan_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(fan_in, fan_out, kernel_init=_token_init, rngs=rngs)


def key_bias_mask(dim: int) -> np.ndarray:
  """[3 * dim] ones with the key third zero: DINOv3's LinearKMaskedBias.bias_mask as its
  init_weights_vit sets it (dinov3/models/vision_transformer.py)."""
  return np.concatenate([np.ones(dim), np.zeros(dim), np.ones(dim)]).astype(np.float32)


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection; with `rope`, the patch tokens'
  queries and keys rotate by their `positions`; with `mask_k_bias`, the key bias is zero."""

  def __init__(self,
               dim: int,
               num_heads: int,
               *,
               rope: RopeOptions | None = None,
               mask_k_bias: bool = False,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'dim={dim} is not divisible by num_heads={num_heads}: change either')
    if rope is not None and (dim // num_heads) % 4:
      raise ValueError(f'RoPE needs a head width divisible by 4, got {dim // num_heads}: change '
                       "model.name or model.pos_embed='learned'")
    self.num_heads = num_heads
    self.rope = rope
    self.mask_k_bias = mask_k_bias
    self.qkv = _linear(dim, 3 * dim, rngs)
    self.proj = _linear(dim, dim, rngs)

  def _project(self, tokens: jax.Array) -> jax.Array:
    if not self.mask_k_bias:
      return self.qkv(tokens)
    # As DINOv3's LinearKMaskedBias: the key bias times 0 neither acts nor learns. (Without RoPE
    # it would add the same logit to every key, which the softmax ignores; RoPE rotates it.)
    bias = self.qkv.bias[...] * key_bias_mask(tokens.shape[-1]).astype(tokens.dtype)
    return tokens @ self.qkv.kernel[...] + bias

  def _rope_tables(self, positions: jax.Array, rope_key: jax.Array | None):
    coords = positions if rope_key is None else augment_coords(positions, rope_key, self.rope)
    head_dim = self.qkv.kernel.shape[0] // self.num_heads
    return sin_cos(coords, rope_periods(self.rope.base, head_dim))

  def _qkv(self, tokens: jax.Array, positions: jax.Array | None, rope_key: jax.Array | None):
    batch, length, dim = tokens.shape
    # qkv features are laid out [3, heads, head_dim], as in DINO's checkpoints.
    qkv = self._project(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    queries, keys, values = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if positions is None:
      return queries, keys, values
    sin, cos = self._rope_tables(positions, rope_key)
    return rotate(queries, sin, cos), rotate(keys, sin, cos), values

  def __call__(self,
               tokens: jax.Array,
               *,
               positions: jax.Array | None = None,
               rope_key: jax.Array | None = None) -> jax.Array:
    """`positions` [h * w, 2]: the RoPE coordinates of the trailing patch tokens (None: no
    RoPE); `rope_key` draws the training-time coordinate augmentations."""
    mixed = jax.nn.dot_product_attention(*self._qkv(tokens, positions, rope_key))
    return self.proj(mixed.reshape(tokens.shape))

  def weights(self, tokens: jax.Array, *, positions: jax.Array | None = None) -> jax.Array:
    """The softmax attention weights [B, heads, queries, keys] that __call__ mixes with."""
    queries, keys, _ = self._qkv(tokens, positions, None)
    logits = jnp.einsum('bqhd,bkhd->bhqk', queries, keys) * queries.shape[-1]**-0.5
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class MLP(nnx.Module):

  def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden_dim, rngs)
    self.fc2 = _linear(hidden_dim, dim, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))


def swiglu_hidden_dim(hidden_dim: int) -> int:
  """DINOv2's fused SwiGLU width for an MLP of `hidden_dim`: 2/3 of it, rounded up to 8 (also
  DINOv3's SwiGLUFFN with its default align_to=8, dinov3/layers/ffn_layers.py)."""
  return (int(hidden_dim * 2 / 3) + 7) // 8 * 8


def ffn_width(dim: int, mlp_ratio: float, ffn: str) -> int:
  """The hidden width of a block's feed-forward (SwiGLU: of each of its two branches)."""
  hidden_dim = int(dim * mlp_ratio)
  return swiglu_hidden_dim(hidden_dim) if ffn == 'swiglu' else hidden_dim


class SwiGLU(nnx.Module):
  """DINOv2's SwiGLUFFNFused: w12 -> (x1, x2) -> silu(x1) * x2 -> w3."""

  def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
    width = swiglu_hidden_dim(hidden_dim)
    self.w12 = _linear(dim, 2 * width, rngs)
    self.w3 = _linear(width, dim, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, value = jnp.split(self.w12(x), 2, axis=-1)
    return self.w3(jax.nn.silu(gate) * value)


class LayerScale(nnx.Module):
  """A learned per-channel gain on a residual branch, initialised to `init_value` (CaiT, DINOv2)."""

  def __init__(self, dim: int, init_value: float):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block; each residual branch has its own stochastic depth draw and, with
  `layerscale` > 0, its own LayerScale."""

  def __init__(self,
               dim: int,
               num_heads: int,
               mlp_ratio: float,
               drop_rate: float,
               *,
               layerscale: float = 0.0,
               ffn: str = 'mlp',
               norm_eps: float = _NORM_EPS,
               rope: RopeOptions | None = None,
               mask_k_bias: bool = False,
               rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, epsilon=norm_eps, rngs=rngs)
    self.attn = Attention(dim, num_heads, rope=rope, mask_k_bias=mask_k_bias, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=norm_eps, rngs=rngs)
    self.mlp = (SwiGLU if ffn == 'swiglu' else MLP)(dim, int(dim * mlp_ratio), rngs=rngs)
    self.ls1 = LayerScale(dim, layerscale) if layerscale else None
    self.ls2 = LayerScale(dim, layerscale) if layerscale else None
    self.drop_rate = drop_rate

  def __call__(self,
               tokens: jax.Array,
               *,
               drop_key: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    attn_key, mlp_key = block_key(drop_key, 0), block_key(drop_key, 1)
    # DINOv3 draws the RoPE augmentations anew for every block (forward_features_list).
    attended = self.attn(self.norm1(tokens), positions=positions, rope_key=block_key(drop_key, 2))
    attended = self.ls1(attended) if self.ls1 is not None else attended
    tokens = tokens + drop_path(attended, self.drop_rate, attn_key)
    transformed = self.mlp(self.norm2(tokens))
    transformed = self.ls2(transformed) if self.ls2 is not None else transformed
    return tokens + drop_path(transformed, self.drop_rate, mlp_key)


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


def resize_position_table(table: jax.Array,
                          grid: tuple[int, int],
                          *,
                          interpolation: str = 'jax',
                          offset: float = 0.0,
                          antialias: bool = False) -> jax.Array:
  """A position table [1, 1 + g * g, dim] (CLS first, then a square grid) for a grid (h, w): the
  patch positions resized bicubically as model.pos_interpolation says (module constants), the
  CLS position kept; the table itself when the grid is its own."""
  side = math.isqrt(table.shape[1] - 1)
  grid_height, grid_width = grid
  if (grid_height, grid_width) == (side, side):
    return table
  cls_position, patch_positions = table[:, :1], table[0, 1:]
  patches = patch_positions.reshape(side, side, -1)
  if interpolation == 'torch':
    matrices = [
        torch_resize_matrix(side, size, (size + offset) / side if offset else None, antialias)
        for size in (grid_height, grid_width)
    ]
    resized = jnp.einsum('oh,hwc,pw->opc', matrices[0], patches.astype(jnp.float32),
                         matrices[1]).astype(patches.dtype)
  else:  # no antialiasing (as DINO): a pure interpolation of the table, also when shrinking
    resized = jax.image.resize(patches, (grid_height, grid_width, patches.shape[-1]),
                               method='bicubic',
                               antialias=False)
  return jnp.concatenate([cls_position, resized.reshape(1, -1, patches.shape[-1])], axis=1)


class ViT(nnx.Module):
  """images [B, H, W, C] -> CLS token after the final LayerNorm [B, dim].

  Position embeddings are learned for the (image_size / patch_size)^2 grid and resized
  bicubically to other grids (local crops, `pos_interpolation`); the CLS position is kept as is.
  With `rope` there is no table: every attention rotates the patch tokens' queries and keys by
  their grid coordinates, at any resolution. Register tokens (no position) follow the CLS token
  inside the blocks and are left out of every output; with `mask_token`, `masks` [B, h * w]
  replace masked patches by it.
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
               layerscale: float = 0.0,
               ffn: str = 'mlp',
               num_registers: int = 0,
               mask_token: bool = False,
               drop_path_uniform: bool = False,
               pos_interpolation: str = 'jax',
               interpolate_offset: float = 0.0,
               interpolate_antialias: bool = False,
               rope: RopeOptions | None = None,
               mask_k_bias: bool = False,
               norm_eps: float = _NORM_EPS,
               rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f'image_size={image_size} is not a multiple of patch_size={patch_size}: '
                       'change the crop size or model.patch_size')
    self.patch_size = patch_size
    self.in_channels = in_channels
    self.grid_size = image_size // patch_size
    self.num_features = dim
    self.remat = remat
    self.num_registers = num_registers
    self.pos_interpolation = pos_interpolation
    self.interpolate_offset = interpolate_offset
    self.interpolate_antialias = interpolate_antialias
    self.rope = rope
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
    table_shape = (1, 1 + self.grid_size**2, dim)
    self.pos_embed = nnx.Param(_token_init(rngs.params(), table_shape)) if rope is None else None
    # DINOv2's inits: registers normal(1e-6), the mask token zeros.
    self.register_tokens = (nnx.Param(1e-6 * jax.random.normal(rngs.params(),
                                                               (1, num_registers, dim)))
                            if num_registers else None)
    self.mask_token = nnx.Param(jnp.zeros((1, dim))) if mask_token else None
    rates = [drop_path_rate] * depth if drop_path_uniform else linear_drop_rates(
        drop_path_rate, depth)
    self.blocks = nnx.List([
        Block(dim,
              num_heads,
              mlp_ratio,
              rate,
              layerscale=layerscale,
              ffn=ffn,
              norm_eps=norm_eps,
              rope=rope,
              mask_k_bias=mask_k_bias,
              rngs=rngs) for rate in rates
    ])
    self.norm = nnx.LayerNorm(dim, epsilon=norm_eps, rngs=rngs)

  def position_embedding(self, grid_height: int, grid_width: int) -> jax.Array:
    """[1, 1 + h * w, dim]: the learned table, bicubically resized when the grid differs."""
    return resize_position_table(self.pos_embed[...], (grid_height, grid_width),
                                 interpolation=self.pos_interpolation,
                                 offset=self.interpolate_offset,
                                 antialias=self.interpolate_antialias)

  def _check_images(self, images: jax.Array):
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f'ViT expects images [B, H, W, {self.in_channels}], got shape '
                       f'{images.shape}: pass channels-last images')
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f'image size {height}x{width} is not a multiple of patch_size='
                       f'{self.patch_size}: resize or crop the images to a multiple')

  def _embed(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
    """images -> tokens [B, 1 + registers + h * w, dim] entering the first block (CLS first,
    then the registers, then the patches, masked ones replaced by the mask token)."""
    self._check_images(images)
    patches = self.patch_embed(images)
    batch, grid_height, grid_width, dim = patches.shape
    patches = patches.reshape(batch, -1, dim)
    if masks is not None:
      if self.mask_token is None:
        raise ValueError('masked patches need the mask token: set model.mask_token=True')
      patches = jnp.where(masks[..., None], self.mask_token[...].astype(patches.dtype), patches)
    cls_tokens = jnp.broadcast_to(self.cls_token[...], (batch, 1, dim))
    tokens = jnp.concatenate([cls_tokens, patches], axis=1)
    if self.pos_embed is not None:
      tokens = tokens + self.position_embedding(grid_height, grid_width)
    if self.register_tokens is None:
      return tokens
    registers = jnp.broadcast_to(self.register_tokens[...].astype(tokens.dtype),
                                 (batch, self.num_registers, dim))
    return jnp.concatenate([tokens[:, :1], registers, tokens[:, 1:]], axis=1)

  def _positions(self, images: jax.Array) -> jax.Array | None:
    """The RoPE coordinates [h * w, 2] of the images' patch grid (None: the learned table)."""
    if self.rope is None:
      return None
    height, width = images.shape[1:3]
    return patch_coords(height // self.patch_size, width // self.patch_size,
                        self.rope.normalize_coords)

  def _run(self, images: jax.Array, masks: jax.Array | None, drop_key: jax.Array | None):
    return run_blocks(self.blocks,
                      self._embed(images, masks),
                      drop_key,
                      remat=self.remat,
                      positions=self._positions(images))

  @property
  def _first_patch(self) -> int:
    return 1 + self.num_registers

  def block_outputs(self, images: jax.Array) -> list[jax.Array]:
    """The token sequences [B, 1 + h * w, dim] after each block, first block first, before the
    final norm (deterministic: no stochastic depth)."""
    tokens, positions = self._embed(images), self._positions(images)
    outputs = []
    for block in self.blocks:
      tokens = block(tokens, positions=positions)
      outputs.append(tokens)
    return outputs

  def cls_attention(self, images: jax.Array) -> jax.Array:
    """The last block's self-attention from the CLS token to every patch, per head:
    [B, heads, h * w] float32, as DINO's get_last_selfattention()[:, :, 0, 1:]."""
    tokens, positions = self._embed(images), self._positions(images)
    for block in self.blocks[:-1]:
      tokens = block(tokens, positions=positions)
    last = self.blocks[-1]
    weights = last.attn.weights(last.norm1(tokens), positions=positions)
    return weights[:, :, 0, self._first_patch:]

  def __call__(self, images: jax.Array, *, drop_key: jax.Array | None = None) -> jax.Array:
    tokens = self._run(images, None, drop_key)
    # The final norm is per token, so normalising only the CLS token gives the same result.
    return self.norm(tokens[:, 0])

  def tokens(self,
             images: jax.Array,
             *,
             masks: jax.Array | None = None,
             drop_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(CLS [B, dim], patches [B, h * w, dim]) after the final LayerNorm, the registers left out;
    `masks` [B, h * w] (bool) put the mask token at masked patches (iBOT's student)."""
    normed = self.norm(self._run(images, masks, drop_key))
    return normed[:, 0], normed[:, self._first_patch:]

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
    pooled = jnp.stack([normed[:, 0], jnp.mean(normed[:, self._first_patch:], axis=1)], axis=-1)
    return pooled.reshape(normed.shape[0], -1)


VIT_SIZES = {
    # vit_nano: the smallest ViT with every code path, for smoke runs and fast tests.
    'vit_nano': dict(dim=32, depth=2, num_heads=2),
    'vit_micro': dict(dim=128, depth=4, num_heads=4),
    'vit_tiny': dict(dim=192, depth=12, num_heads=3),
    'vit_small': dict(dim=384, depth=12, num_heads=6),
    'vit_base': dict(dim=768, depth=12, num_heads=12),
    'vit_large': dict(dim=1024, depth=24, num_heads=16),
    'vit_giant2': dict(dim=1536, depth=40, num_heads=24),  # DINOv2's ViT-g (64 per head)
}


def _rope_factors(model_config) -> list[tuple[str, float]]:
  return [(key, model_config[key]) for key in ('rope_jitter_coords', 'rope_rescale_coords')]


def rope_options(model_config) -> RopeOptions | None:
  """The RoPE of `config.model` (None: the learned position table)."""
  if model_config.pos_embed != 'rope':
    return None
  return RopeOptions(base=model_config.rope_base,
                     normalize_coords=model_config.rope_normalize_coords,
                     shift_coords=model_config.rope_shift_coords,
                     jitter_coords=model_config.rope_jitter_coords,
                     rescale_coords=model_config.rope_rescale_coords)


def validate_vit_options(model_config):
  """The ViT options of `config.model`; ValueError naming the key and the choices."""
  checks = [
      (model_config.ffn in FFNS, f"unknown model.ffn '{model_config.ffn}': choose one of "
       f"{', '.join(FFNS)}"),
      (model_config.pos_interpolation in POS_INTERPOLATIONS,
       f"unknown model.pos_interpolation '{model_config.pos_interpolation}': choose one of "
       f"{', '.join(POS_INTERPOLATIONS)}"),
      (model_config.layerscale
       >= 0, f'model.layerscale={model_config.layerscale} must be >= 0 (0: no LayerScale)'),
      (model_config.num_registers
       >= 0, f'model.num_registers={model_config.num_registers} must be >= 0'),
      (0 <= model_config.interpolate_offset < 1,
       f'model.interpolate_offset={model_config.interpolate_offset} must be in [0, 1) (DINOv2: '
       '0.1)'),
      (model_config.pos_embed in POS_EMBEDS, f"unknown model.pos_embed '{model_config.pos_embed}'"
       f": choose one of {', '.join(POS_EMBEDS)}"),
      (model_config.rope_normalize_coords in NORMALIZE_COORDS,
       f"unknown model.rope_normalize_coords '{model_config.rope_normalize_coords}': choose one "
       f"of {', '.join(NORMALIZE_COORDS)}"),
      (model_config.rope_base > 0, f'model.rope_base={model_config.rope_base} must be > 0'),
      (model_config.rope_shift_coords
       >= 0, f'model.rope_shift_coords={model_config.rope_shift_coords} must be >= 0 (0: off)'),
      *[(value == 0 or value >= 1, f'model.{key}={value} must be 0 (off) or >= 1')
        for key, value in _rope_factors(model_config)],
      (model_config.norm_eps > 0, f'model.norm_eps={model_config.norm_eps} must be > 0'),
      (model_config.mlp_ratio > 0, f'model.mlp_ratio={model_config.mlp_ratio} must be > 0'),
  ]
  for holds, message in checks:
    if not holds:
      raise ValueError(message)


def _register_vit(name: str, size: dict):

  @register_backbone(name, uses_patches=True, validate=validate_vit_options)
  def build(model_config, *, in_channels, image_size, rngs):
    return ViT(patch_size=model_config.patch_size,
               mlp_ratio=model_config.mlp_ratio,
               drop_path_rate=model_config.drop_path,
               in_channels=in_channels,
               remat=model_config.remat,
               image_size=image_size,
               stem=model_config.stem,
               layerscale=model_config.layerscale,
               ffn=model_config.ffn,
               num_registers=model_config.num_registers,
               mask_token=model_config.mask_token,
               drop_path_uniform=model_config.drop_path_uniform,
               pos_interpolation=model_config.pos_interpolation,
               interpolate_offset=model_config.interpolate_offset,
               interpolate_antialias=model_config.interpolate_antialias,
               rope=rope_options(model_config),
               mask_k_bias=model_config.mask_k_bias,
               norm_eps=model_config.norm_eps,
               rngs=rngs,
               **size)


for _name, _size in VIT_SIZES.items():
  _register_vit(_name, _size)
