"""DINOv3's ViT in plain PyTorch, written here from the definitions of facebookresearch/dinov3
(dinov3/models/vision_transformer.py: DinoVisionTransformer; dinov3/layers/: RopePositionEmbedding,
SelfAttention with rope_apply and LinearKMaskedBias, Mlp, SwiGLUFFN, LayerScale,
SelfAttentionBlock, PatchEmbed) in evaluation mode: the reference for kldino's DINOv3 options.
Names are DINOv3's, buffers included (rope_embed.periods, attn.qkv.bias_mask), so that its
state_dict() is what a DINOv3 hub file holds. Checked against the official code: the token order
(CLS, storage tokens, patches), no position table, RoPE on the patch tokens' queries and keys
only, the periods base ** (2i / (D_head / 2)), the coordinates (arange(0.5, H) / H * 2 - 1 for
'separate'), the angle layout ([h-angles, w-angles] tiled twice, rotate_half on halves), the
masked bias (bias * bias_mask, the mask 1 / 0 / 1 as init_weights_vit sets it), the unfused
SwiGLU (w1, w2, w3; width int(2/3 hidden) rounded up to 8), LayerNorm eps 1e-5 for
'layernormbf16', and one final norm for all tokens (no untied CLS norms). Training-time
coordinate augmentations and untie_*_norm are left out.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# DINOv3's Mlp (fc1, GELU, fc2) and LayerScale (gamma) are DINOv2's: the same modules and names.
from tests.torch_dinov2 import LayerScale, Mlp

NORM_EPS = {'layernorm': 1e-6, 'layernormbf16': 1e-5}


class RopePositionEmbedding(nn.Module):

  def __init__(self, dim, num_heads, base=100.0, normalize_coords='separate'):
    super().__init__()
    head_dim = dim // num_heads
    self.normalize_coords = normalize_coords
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    self.register_buffer('periods', base**exponents, persistent=True)

  def forward(self, height, width):
    divisors = {
        'separate': (height, width),
        'max': (max(height, width),) * 2,
        'min': (min(height, width),) * 2
    }[self.normalize_coords]
    rows = torch.arange(0.5, height, dtype=torch.float32) / divisors[0]
    columns = torch.arange(0.5, width, dtype=torch.float32) / divisors[1]
    coords = torch.stack(torch.meshgrid(rows, columns, indexing='ij'), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def rope_apply(x, sin, cos):
  first, second = x.chunk(2, dim=-1)
  return x * cos + torch.cat([-second, first], dim=-1) * sin


class LinearKMaskedBias(nn.Linear):

  def __init__(self, fan_in, fan_out):
    super().__init__(fan_in, fan_out)
    third = fan_out // 3
    self.register_buffer('bias_mask',
                         torch.cat([torch.ones(third),
                                    torch.zeros(third),
                                    torch.ones(third)]))

  def forward(self, x):
    return F.linear(x, self.weight, self.bias * self.bias_mask)


class SelfAttention(nn.Module):

  def __init__(self, dim, num_heads, mask_k_bias):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = (LinearKMaskedBias if mask_k_bias else nn.Linear)(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, rope):
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    q, k, v = [t.transpose(1, 2) for t in torch.unbind(qkv, 2)]
    sin, cos = rope
    prefix = length - sin.shape[-2]
    q = torch.cat([q[:, :, :prefix], rope_apply(q[:, :, prefix:], sin, cos)], dim=-2)
    k = torch.cat([k[:, :, :prefix], rope_apply(k[:, :, prefix:], sin, cos)], dim=-2)
    weights = ((q * (dim // self.num_heads)**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    self.last_weights = weights
    return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class SwiGLUFFN(nn.Module):

  def __init__(self, dim, hidden, align_to=8):
    super().__init__()
    width = int(hidden * 2 / 3)
    width += -width % align_to
    self.w1, self.w2 = nn.Linear(dim, width), nn.Linear(dim, width)
    self.w3 = nn.Linear(width, dim)

  def forward(self, x):
    return self.w3(F.silu(self.w1(x)) * self.w2(x))


class SelfAttentionBlock(nn.Module):

  def __init__(self, dim, num_heads, ffn_ratio, ffn_layer, init_values, mask_k_bias, eps):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.attn = SelfAttention(dim, num_heads, mask_k_bias)
    self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.mlp = (SwiGLUFFN if ffn_layer == 'swiglu' else Mlp)(dim, int(dim * ffn_ratio))
    self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

  def forward(self, x, rope):
    x = x + self.ls1(self.attn(self.norm1(x), rope))
    return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):

  def __init__(self,
               *,
               patch_size=16,
               in_chans=3,
               embed_dim=384,
               depth=12,
               num_heads=6,
               ffn_ratio=4.0,
               ffn_layer='mlp',
               layerscale_init=1e-5,
               n_storage_tokens=4,
               mask_k_bias=True,
               norm_layer='layernormbf16',
               pos_embed_rope_base=100.0,
               pos_embed_rope_normalize_coords='separate'):
    super().__init__()
    self.patch_size = patch_size
    self.n_storage_tokens = n_storage_tokens
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
    if n_storage_tokens:
      self.storage_tokens = nn.Parameter(torch.randn(1, n_storage_tokens, embed_dim) * 0.02)
    self.rope_embed = RopePositionEmbedding(embed_dim, num_heads, pos_embed_rope_base,
                                            pos_embed_rope_normalize_coords)
    eps = NORM_EPS[norm_layer]
    self.blocks = nn.ModuleList([
        SelfAttentionBlock(embed_dim, num_heads, ffn_ratio, ffn_layer, layerscale_init, mask_k_bias,
                           eps) for _ in range(depth)
    ])
    self.norm = nn.LayerNorm(embed_dim, eps=eps)
    self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

  def prepare_tokens_with_masks(self, x, masks=None):
    x = self.patch_embed.proj(x)  # B D H W
    height, width = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)
    if masks is not None:
      x = torch.where(masks.unsqueeze(-1), self.mask_token.unsqueeze(0), x)
    prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
    if self.n_storage_tokens:
      prefix.append(self.storage_tokens.expand(x.shape[0], -1, -1))
    return torch.cat([*prefix, x], dim=1), (height, width)

  def _blocks(self, x, masks=None):
    x, (height, width) = self.prepare_tokens_with_masks(x, masks)
    outputs = []
    for block in self.blocks:
      x = block(x, self.rope_embed(height, width))
      outputs.append(x)
    return outputs

  def forward_features(self, x, masks=None):
    x_norm = self.norm(self._blocks(x, masks)[-1])
    return {
        'x_norm_clstoken': x_norm[:, 0],
        'x_storage_tokens': x_norm[:, 1:self.n_storage_tokens + 1],
        'x_norm_patchtokens': x_norm[:, self.n_storage_tokens + 1:],
        'last_attention': self.blocks[-1].attn.last_weights,
    }

  def get_intermediate_layers(self, x, n=1):
    """get_intermediate_layers(x, n, return_class_token=True, norm=True): (patch tokens, class
    token) of each of the last n blocks, through the final norm."""
    outputs = [self.norm(out) for out in self._blocks(x)[-n:]]
    return [(out[:, 1 + self.n_storage_tokens:], out[:, 0]) for out in outputs]
