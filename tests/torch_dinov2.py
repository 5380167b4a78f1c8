"""DINOv2's ViT in plain PyTorch, written here from the definitions of facebookresearch/dinov2
(dinov2/models/vision_transformer.py: DinoVisionTransformer; dinov2/layers/: Attention, Mlp,
SwiGLUFFNFused, LayerScale, Block, PatchEmbed) in evaluation mode: the reference for kldino's
ViT options. Parameter names are DINOv2's, so that its state dict is what a DINOv2 checkpoint
holds. Checked against the official code: the block order (norm1 -> attn -> ls1 -> residual,
norm2 -> mlp -> ls2 -> residual), the fused SwiGLU width (int(4D * 2/3) + 7) // 8 * 8, registers
inserted after the position embedding, the mask token before it, and interpolate_pos_encoding's
scale factor (w0 + offset) / M with antialias.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    weights = ((q * (dim // self.num_heads)**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    self.last_weights = weights
    return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFused(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    gate, value = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):

  def __init__(self, dim, init_values):
    super().__init__()
    self.gamma = nn.Parameter(init_values * torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Block(nn.Module):

  def __init__(self, dim, num_heads, ffn, init_values):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = (SwiGLUFused if ffn == 'swiglu' else Mlp)(dim, 4 * dim)
    self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):

  def __init__(self, in_chans, dim, patch_size):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):

  def __init__(self,
               *,
               img_size,
               patch_size,
               in_chans,
               dim,
               depth,
               num_heads,
               ffn='mlp',
               init_values=None,
               num_register_tokens=0,
               interpolate_offset=0.1,
               interpolate_antialias=False):
    super().__init__()
    self.patch_size = patch_size
    self.num_register_tokens = num_register_tokens
    self.interpolate_offset = interpolate_offset
    self.interpolate_antialias = interpolate_antialias
    self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
    num_patches = (img_size // patch_size)**2
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
    self.register_tokens = (nn.Parameter(torch.randn(1, num_register_tokens, dim) *
                                         0.02) if num_register_tokens else None)
    self.blocks = nn.ModuleList([Block(dim, num_heads, ffn, init_values) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.mask_token = nn.Parameter(torch.randn(1, dim) * 0.02)

  def interpolate_pos_encoding(self, x, w, h):
    npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
    if npatch == n and w == h:
      return self.pos_embed
    class_pos, patch_pos = self.pos_embed[:, 0], self.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0, h0 = w // self.patch_size, h // self.patch_size
    side = int(math.sqrt(n))
    if self.interpolate_offset:
      sizing = {
          'scale_factor': (
              (w0 + self.interpolate_offset) / side, (h0 + self.interpolate_offset) / side)
      }
    else:
      sizing = {'size': (w0, h0)}
    patch_pos = F.interpolate(patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                              mode='bicubic',
                              antialias=self.interpolate_antialias,
                              **sizing)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos.unsqueeze(0), patch_pos), dim=1)

  def prepare_tokens_with_masks(self, x, masks=None):
    _, _, w, h = x.shape
    x = self.patch_embed(x)
    if masks is not None:
      x = torch.where(masks.unsqueeze(-1), self.mask_token.unsqueeze(0), x)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + self.interpolate_pos_encoding(x, w, h)
    if self.register_tokens is not None:
      x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
    return x

  def forward_features(self, x, masks=None):
    x = self.prepare_tokens_with_masks(x, masks)
    for block in self.blocks:
      x = block(x)
    x_norm = self.norm(x)
    return {
        'x_norm_clstoken': x_norm[:, 0],
        'x_norm_patchtokens': x_norm[:, self.num_register_tokens + 1:],
        'last_attention': self.blocks[-1].attn.last_weights,
    }

  def get_intermediate_layers(self, x, n=1):
    """DINOv2's get_intermediate_layers(x, n, return_class_token=True, norm=True): (patch tokens,
    class token) of each of the last n blocks, through the final norm."""
    x = self.prepare_tokens_with_masks(x)
    outputs = []
    for index, block in enumerate(self.blocks):
      x = block(x)
      if index >= len(self.blocks) - n:
        outputs.append(self.norm(x))
    return [(out[:, 1 + self.num_register_tokens:], out[:, 0]) for out in outputs]


# DINOv2's losses (dinov2/loss/ibot_patch_loss.py, koleo_loss.py), one process.


def ibot_patch_loss_masked(student_masked, teacher_masked, masks, student_temp):
  """iBOTPatchLoss.forward_masked: student and teacher rows of the masked patches, in the order
  of masks.flatten().nonzero(); masks [crops, patches]."""
  loss = torch.sum(teacher_masked * F.log_softmax(student_masked / student_temp, dim=-1), dim=-1)
  weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
  return -(loss * weights).sum() / masks.shape[0]


def sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
  """iBOTPatchLoss.sinkhorn_knopp_teacher on the masked patches' logits."""
  q = torch.exp(teacher_output.float() / teacher_temp).t()
  count, prototypes = q.shape[1], q.shape[0]
  q /= torch.sum(q)
  for _ in range(n_iterations):
    q /= torch.sum(q, dim=1, keepdim=True)
    q /= prototypes
    q /= torch.sum(q, dim=0, keepdim=True)
    q /= count
  q *= count
  return q.t()


def koleo_loss(student_output, eps=1e-8):
  """KoLeoLoss.forward."""
  student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
  dots = torch.mm(student_output, student_output.t())
  dots.view(-1)[::(student_output.shape[0] + 1)].fill_(-1)
  nearest = torch.max(dots, dim=1).indices
  distances = nn.PairwiseDistance(2, eps=eps)(student_output, student_output[nearest])
  return -torch.log(distances + eps).mean()
