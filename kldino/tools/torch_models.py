"""The PyTorch models of the bench's baseline (kldino/tools/torch_baseline.py): DINO's ViT with
DINOv2's options (LayerScale, the fused SwiGLU, register tokens, the mask token, the interpolation
of position embeddings with an offset and antialiasing) and DINO's head, written the way the
official repositories build them (facebookresearch/dino vision_transformer.py; dinov2/layers/,
dinov2/models/vision_transformer.py). Parameter names are the official ones, so that
kldino/modes/import_dino.py reads their state dicts as a DINO or DINOv2 checkpoint. Needs the
`torch` extra.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kldino.models.layers import linear_drop_rates
from kldino.models.vit import VIT_SIZES, swiglu_hidden_dim


def drop_path(branch: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
  """Stochastic depth per sample, scaled by 1 / keep (DINO's drop_path)."""
  if rate == 0.0 or not training:
    return branch
  keep = 1.0 - rate
  mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)
  return branch * mask / keep


class PatchEmbed(nn.Module):

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, images):  # [B, C, H, W] -> [B, N, D]
    return self.proj(images).flatten(2).transpose(1, 2)


class RopeEmbedding(nn.Module):
  """DINOv3's RopePositionEmbedding without its training-time augmentations: the (sin, cos)
  [h * w, head_dim] of a patch grid, coordinates of the patch centres in [-1, 1] per axis."""

  def __init__(self, head_dim: int, base: float, normalize_coords: str):
    super().__init__()
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    self.register_buffer('periods', base**exponents)
    self.normalize_coords = normalize_coords

  def forward(self, height: int, width: int):
    divisors = {
        'separate': (height, width),
        'max': (max(height, width),) * 2,
        'min': (min(height, width),) * 2
    }[self.normalize_coords]
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) / divisors[0]
    columns = (torch.arange(width, dtype=torch.float32) + 0.5) / divisors[1]
    coords = 2.0 * torch.stack(torch.meshgrid(rows, columns, indexing='ij'), dim=-1) - 1.0
    angles = 2 * math.pi * coords.reshape(-1, 2, 1) / self.periods  # [n, 2, head_dim / 4]
    angles = angles.flatten(1).tile(2)
    return torch.sin(angles), torch.cos(angles)


def rotate_patches(x: torch.Tensor, rope) -> torch.Tensor:
  """RoPE on the patch tokens (the last h * w) of queries or keys [B, heads, N, head_dim]."""
  sin, cos = rope
  prefix = x.shape[2] - sin.shape[0]
  first, second = x[:, :, prefix:].chunk(2, dim=-1)
  rotated = x[:, :, prefix:] * cos + torch.cat([-second, first], dim=-1) * sin
  return torch.cat([x[:, :, :prefix], rotated], dim=2)


class Attention(nn.Module):

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads)**-0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, rope=None, return_attention: bool = False):
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
    if rope is not None:
      q, k = rotate_patches(q, rope), rotate_patches(k, rope)
    weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    if return_attention:
      return weights
    return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFNFused(nn.Module):
  """DINOv2's SwiGLU: one matmul to the gate and the value, silu(gate) * value, one back."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    width = swiglu_hidden_dim(hidden)
    self.w12 = nn.Linear(dim, 2 * width)
    self.w3 = nn.Linear(width, dim)

  def forward(self, x):
    gate, value = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):

  def __init__(self, dim: int, init_values: float):
    super().__init__()
    self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

  def forward(self, x):
    return x * self.gamma


class Block(nn.Module):
  """Pre-norm block; `init_values` > 0 adds DINOv2's LayerScale (ls1, ls2) to both branches."""

  def __init__(self,
               dim: int,
               num_heads: int,
               drop_rate: float = 0.0,
               *,
               init_values: float = 0.0,
               ffn: str = 'mlp'):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = (SwiGLUFFNFused if ffn == 'swiglu' else Mlp)(dim, 4 * dim)
    self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
    self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
    self.drop_rate = drop_rate

  def forward(self, x, rope=None):
    x = x + drop_path(self.ls1(self.attn(self.norm1(x), rope)), self.drop_rate, self.training)
    return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_rate, self.training)


class VisionTransformer(nn.Module):
  """DINO's ViT, with DINOv2's options. Position embeddings of other grids are resized bicubically
  (PyTorch's, a = -0.75): to the grid's size, or with `interpolate_offset` > 0 by DINOv2's scale
  factor (grid + offset) / trained grid, antialiased with `interpolate_antialias`. With
  `rope_base` there is no table: DINOv3's RoPE rotates the patch tokens in every attention."""

  def __init__(self,
               img_size: int,
               patch_size: int,
               in_chans: int,
               embed_dim: int,
               depth: int,
               num_heads: int,
               drop_path_rate: float = 0.0,
               *,
               drop_path_uniform: bool = False,
               init_values: float = 0.0,
               ffn: str = 'mlp',
               num_register_tokens: int = 0,
               mask_token: bool = False,
               interpolate_offset: float = 0.0,
               interpolate_antialias: bool = False,
               rope_base: float | None = None,
               rope_normalize_coords: str = 'separate'):
    super().__init__()
    self.grid = img_size // patch_size
    self.num_register_tokens = num_register_tokens
    self.interpolate_offset = interpolate_offset
    self.interpolate_antialias = interpolate_antialias
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
    if rope_base is None:
      self.pos_embed = nn.Parameter(torch.randn(1, self.grid**2 + 1, embed_dim) * 0.02)
    else:
      self.rope_embed = RopeEmbedding(embed_dim // num_heads, rope_base, rope_normalize_coords)
    if num_register_tokens:
      self.register_tokens = nn.Parameter(torch.randn(1, num_register_tokens, embed_dim) * 1e-6)
    if mask_token:
      self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
    rates = ([drop_path_rate] *
             depth if drop_path_uniform else linear_drop_rates(drop_path_rate, depth))
    self.blocks = nn.ModuleList(
        [Block(embed_dim, num_heads, rate, init_values=init_values, ffn=ffn) for rate in rates])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

  def _position_embedding(self, height: int, width: int) -> torch.Tensor:
    if (height, width) == (self.grid, self.grid):
      return self.pos_embed
    cls_position, table = self.pos_embed[:, :1], self.pos_embed[:, 1:]
    dim = table.shape[-1]
    table = table.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
    if self.interpolate_offset:
      sizing = {
          'scale_factor':
              tuple((size + self.interpolate_offset) / self.grid for size in (height, width))
      }
    else:
      sizing = {'size': (height, width)}
    table = F.interpolate(table, mode='bicubic', antialias=self.interpolate_antialias, **sizing)
    return torch.cat([cls_position, table.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

  def _embed(self, images, masks=None):
    """(tokens entering the first block: CLS, the registers, the patches, masked ones replaced by
    the mask token before the position embedding is added, as DINOv2; RoPE's (sin, cos) or
    None)."""
    tokens = self.patch_embed(images)
    if masks is not None:
      tokens = torch.where(masks.unsqueeze(-1),
                           self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
    patch = self.patch_embed.proj.kernel_size[0]
    grid = (images.shape[2] // patch, images.shape[3] // patch)
    cls = self.cls_token.expand(tokens.shape[0], -1, -1)
    tokens = torch.cat([cls, tokens], dim=1)
    rope = self.rope_embed(*grid) if hasattr(self, 'rope_embed') else None
    if rope is None:
      tokens = tokens + self._position_embedding(*grid)
    if self.num_register_tokens:
      registers = self.register_tokens.expand(tokens.shape[0], -1, -1)
      tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
    return tokens, rope

  def _block_outputs(self, images, masks=None, blocks: int | None = None):
    """The token sequences after each of the first `blocks` blocks (all by default), and RoPE's
    tables."""
    tokens, rope = self._embed(images, masks)
    outputs = []
    for block in self.blocks[:blocks]:
      tokens = block(tokens, rope)
      outputs.append(tokens)
    return outputs or [tokens], rope

  def forward_tokens(self, images, masks=None):
    """(CLS [B, D], patches [B, N, D]) after the final norm, the registers left out."""
    normed = self.norm(self._block_outputs(images, masks)[0][-1])
    return normed[:, 0], normed[:, 1 + self.num_register_tokens:]

  def forward(self, images):
    return self.norm(self._block_outputs(images)[0][-1][:, 0])

  def get_last_selfattention(self, images):
    """The last block's attention weights [B, heads, N + 1, N + 1] (DINO's visualisation)."""
    outputs, rope = self._block_outputs(images, blocks=len(self.blocks) - 1)
    last = self.blocks[-1]
    return last.attn(last.norm1(outputs[-1]), rope, return_attention=True)

  def get_intermediate_layers(self, images, n: int = 1):
    """The whole token sequences after each of the last n blocks, each through `norm`."""
    return [self.norm(tokens) for tokens in self._block_outputs(images)[0][-n:]]


def vision_transformer(model_config, in_channels: int, image_size: int) -> VisionTransformer:
  """The ViT of a kldino `config.model` (a name of kldino/models/vit.py's VIT_SIZES)."""
  size = VIT_SIZES[model_config.name]
  torch_resize = model_config.pos_interpolation == 'torch'
  return VisionTransformer(
      image_size,
      model_config.patch_size,
      in_channels,
      size['dim'],
      size['depth'],
      size['num_heads'],
      drop_path_rate=model_config.drop_path,
      drop_path_uniform=model_config.drop_path_uniform,
      init_values=model_config.layerscale,
      ffn=model_config.ffn,
      num_register_tokens=model_config.num_registers,
      mask_token=model_config.mask_token,
      interpolate_offset=model_config.interpolate_offset if torch_resize else 0.0,
      interpolate_antialias=torch_resize and model_config.interpolate_antialias,
      rope_base=model_config.rope_base if model_config.pos_embed == 'rope' else None,
      rope_normalize_coords=model_config.rope_normalize_coords)


class DINOHead(nn.Module):
  """MLP (exact GELU between layers) -> bottleneck z -> cosines against K unit prototypes,
  `last_layer.weight_v` [K, bottleneck]; the gain `last_layer.weight_g` [K, 1] is fixed at 1
  with `norm_last_layer` (DINO's default) and learned from 1 without it (DINOv2's)."""

  def __init__(self,
               in_dim: int,
               hidden_dim: int,
               bottleneck_dim: int,
               num_layers: int,
               num_prototypes: int,
               norm_last_layer: bool = True):
    super().__init__()
    widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
      layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
    self.mlp = nn.Sequential(*layers[:-1])
    self.last_layer = nn.Module()
    bound = 1.0 / math.sqrt(bottleneck_dim)
    self.last_layer.weight_v = nn.Parameter(
        torch.empty(num_prototypes, bottleneck_dim).uniform_(-bound, bound))
    if not norm_last_layer:
      self.last_layer.weight_g = nn.Parameter(torch.ones(num_prototypes, 1))

  def forward(self, features):
    z = F.normalize(self.mlp(features), dim=-1)
    cosines = z @ F.normalize(self.last_layer.weight_v, dim=-1).t()
    gain = getattr(self.last_layer, 'weight_g', None)
    return cosines if gain is None else cosines * gain.t()


def dino_head(model_config) -> DINOHead:
  """The head of a kldino `config.model` on a ViT of its size."""
  return DINOHead(VIT_SIZES[model_config.name]['dim'], model_config.head_hidden_dim,
                  model_config.head_bottleneck_dim, model_config.head_num_layers,
                  model_config.num_prototypes, model_config.norm_last_layer)
