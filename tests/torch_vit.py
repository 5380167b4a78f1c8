"""A PyTorch ViT with the module names and conventions of the official DINO backbone
(`vision_transformer.VisionTransformer`: pre-norm blocks, fused qkv with bias, exact GELU,
LayerNorm eps 1e-6, CLS token after the final norm), written here as the reference for import.
"""
import torch
from torch import nn


class PatchEmbed(nn.Module):

  def __init__(self, patch_size, in_chans, embed_dim):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, images):  # [B, C, H, W] -> [B, N, D]
    return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads)**-0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, return_attention=False):
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
    weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    if return_attention:
      return weights
    return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):

  def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads):
    super().__init__()
    num_patches = (img_size // patch_size)**2
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Identity()

  def _embed(self, images):
    tokens = self.patch_embed(images)
    cls = self.cls_token.expand(tokens.shape[0], -1, -1)
    return torch.cat([cls, tokens], dim=1) + self.pos_embed

  def forward(self, images):
    tokens = self._embed(images)
    for block in self.blocks:
      tokens = block(tokens)
    return self.norm(tokens)[:, 0]

  def get_last_selfattention(self, images):
    """The last block's attention weights [B, heads, N + 1, N + 1] (DINO's visualisation)."""
    tokens = self._embed(images)
    for block in self.blocks[:-1]:
      tokens = block(tokens)
    return self.blocks[-1].attn(self.blocks[-1].norm1(tokens), return_attention=True)

  def get_intermediate_layers(self, images, n=1):
    """The whole token sequences after each of the last n blocks, each through `norm`."""
    tokens = self._embed(images)
    normed = []
    for index, block in enumerate(self.blocks):
      tokens = block(tokens)
      if index >= len(self.blocks) - n:
        normed.append(self.norm(tokens))
    return normed


def linear_eval_features(model, images, n_last_blocks=1, avgpool_patchtokens=False):
  """DINO's linear-evaluation input: the CLS tokens of the last n normed layers side by side
  (earliest first); with avgpool, the CLS feature and the patch-token mean of the last layer
  alternate element by element, [cls_0, mean_0, cls_1, mean_1, ...]."""
  layers = model.get_intermediate_layers(images, n_last_blocks)
  features = torch.cat([layer[:, 0] for layer in layers], dim=-1)
  if avgpool_patchtokens:
    patch_mean = layers[-1][:, 1:].mean(dim=1)
    features = torch.stack([features, patch_mean], dim=-1).flatten(1)
  return features
