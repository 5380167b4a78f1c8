"""The PyTorch baseline of `python -m kldino.bench --baseline=torch`: kldino's train step written
the way the official DINO trains (eager PyTorch, main_dino.py's order of operations), so that the
benchmark puts kldino's step next to what its users would otherwise run, in one process.

One step as kldino/core/step.py's: the teacher on the global crops -> targets (`prior` or
`center`) -> the student on every crop (one backbone call per resolution, DINO's
MultiCropWrapper) -> the multi-crop cross-entropy -> backward -> each parameter's gradient
clipped -> the prototypes' gradient dropped while frozen -> AdamW with DINO's two parameter
groups -> the teacher's EMA. The modules keep the official DINO names, so that
kldino/modes/import_dino.py reads their state dicts as DINO's. Needs the `torch` extra.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kldino.models.layers import linear_drop_rates
from kldino.models.vit import VIT_SIZES

NORMALIZATIONS = ('prior', 'center')


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


class Attention(nn.Module):

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads)**-0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, return_attention: bool = False):
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
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


class Block(nn.Module):

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_rate: float = 0.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.drop_rate = drop_rate

  def forward(self, x):
    x = x + drop_path(self.attn(self.norm1(x)), self.drop_rate, self.training)
    return x + drop_path(self.mlp(self.norm2(x)), self.drop_rate, self.training)


class VisionTransformer(nn.Module):
  """DINO's ViT; position embeddings are resized bicubically for other grids (DINO's
  interpolate_pos_encoding, as PyTorch's bicubic, a = -0.75)."""

  def __init__(self,
               img_size: int,
               patch_size: int,
               in_chans: int,
               embed_dim: int,
               depth: int,
               num_heads: int,
               drop_path_rate: float = 0.0):
    super().__init__()
    self.grid = img_size // patch_size
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, self.grid**2 + 1, embed_dim) * 0.02)
    self.blocks = nn.ModuleList([
        Block(embed_dim, num_heads, drop_rate=rate)
        for rate in linear_drop_rates(drop_path_rate, depth)
    ])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

  def _position_embedding(self, height: int, width: int) -> torch.Tensor:
    if (height, width) == (self.grid, self.grid):
      return self.pos_embed
    cls_position, table = self.pos_embed[:, :1], self.pos_embed[:, 1:]
    dim = table.shape[-1]
    table = table.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(height, width), mode='bicubic', align_corners=False)
    return torch.cat([cls_position, table.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

  def _embed(self, images):
    tokens = self.patch_embed(images)
    patch = self.patch_embed.proj.kernel_size[0]
    position = self._position_embedding(images.shape[2] // patch, images.shape[3] // patch)
    cls = self.cls_token.expand(tokens.shape[0], -1, -1)
    return torch.cat([cls, tokens], dim=1) + position

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

  def get_intermediate_layers(self, images, n: int = 1):
    """The whole token sequences after each of the last n blocks, each through `norm`."""
    tokens = self._embed(images)
    normed = []
    for index, block in enumerate(self.blocks):
      tokens = block(tokens)
      if index >= len(self.blocks) - n:
        normed.append(self.norm(tokens))
    return normed


class DINOHead(nn.Module):
  """MLP (exact GELU between layers) -> bottleneck z -> cosines against K unit prototypes,
  `last_layer.weight_v` [K, bottleneck] with the gain weight_g fixed at 1 (norm_last_layer)."""

  def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, num_layers: int,
               num_prototypes: int):
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

  def forward(self, features):
    z = F.normalize(self.mlp(features), dim=-1)
    return z @ F.normalize(self.last_layer.weight_v, dim=-1).t()


class DinoModel(nn.Module):
  """Backbone + head; `forward(crops)` runs each resolution's crops through the backbone in one
  call and the head on all of them, as DINO's MultiCropWrapper."""

  def __init__(self, model_config, in_channels: int, image_size: int):
    super().__init__()
    size = VIT_SIZES[model_config.name]
    self.backbone = VisionTransformer(image_size,
                                      model_config.patch_size,
                                      in_channels,
                                      size['dim'],
                                      size['depth'],
                                      size['num_heads'],
                                      drop_path_rate=model_config.drop_path)
    self.head = DINOHead(size['dim'], model_config.head_hidden_dim,
                         model_config.head_bottleneck_dim, model_config.head_num_layers,
                         model_config.num_prototypes)

  def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
    """crops: one [B * V_r, C, H_r, W_r] tensor per resolution -> logits [sum V_r B, K]."""
    return self.head(torch.cat([self.backbone(images) for images in crops]))


def check_config(config):
  """ValueError naming what the baseline does not build (it mirrors the bench presets' step)."""
  model = config.model
  problems = []
  if model.name not in VIT_SIZES:
    problems.append(f"model.name='{model.name}' (a ViT: {', '.join(VIT_SIZES)})")
  if model.head_norm != 'none':
    problems.append(f"model.head_norm='{model.head_norm}' ('none', DINO's head)")
  if not model.norm_last_layer or model.prototypes != 'learned':
    problems.append('model.norm_last_layer=True with learned prototypes')
  normalization = config.objective.normalization
  if normalization not in NORMALIZATIONS or (normalization == 'prior' and
                                             config.objective.prior_source != 'sweep'):
    problems.append(f"objective.normalization='{normalization}' ('prior' from the prior pass, "
                    "or 'center')")
  if config.objective.ibot.loss_weight or config.objective.koleo_weight:
    problems.append('objective.ibot.loss_weight=0 and objective.koleo_weight=0 (no iBOT, no KoLeo)')
  if model.layerscale or model.ffn != 'mlp' or model.num_registers:
    problems.append("DINO's ViT (model.layerscale=0, model.ffn='mlp', model.num_registers=0)")
  if config.optim.clip_mode != 'per_param':
    problems.append(f"optim.clip_mode='{config.optim.clip_mode}' ('per_param', DINO's)")
  if problems:
    raise ValueError('the PyTorch baseline builds DINO\'s step only; this config has ' +
                     '; '.join(problems))


def _param_groups(model: nn.Module) -> list[dict]:
  """DINO's get_params_groups: weight decay on matrices, not on biases and 1-d parameters."""
  decayed, not_decayed = [], []
  for name, param in model.named_parameters():
    (not_decayed if name.endswith('.bias') or param.ndim == 1 else decayed).append(param)
  return [{'params': decayed}, {'params': not_decayed, 'weight_decay': 0.0}]


class TorchDinoStep:
  """One training step of kldino's, in PyTorch. `step(global_crops, local_crops)` takes NHWC
  tensors [B, V, H, W, C] (as kldino's batches) and returns the loss (a float)."""

  def __init__(self, config, in_channels: int, *, seed: int = 0):
    check_config(config)
    torch.manual_seed(seed)
    self.config = config
    self.student = DinoModel(config.model, in_channels, config.aug.global_size)
    self.teacher = DinoModel(config.model, in_channels, config.aug.global_size)
    self.teacher.load_state_dict(self.student.state_dict())
    self.teacher.requires_grad_(False)
    scaled_lr = config.optim.lr * config.batch_size / 256
    self.optimizer = torch.optim.AdamW(_param_groups(self.student),
                                       lr=scaled_lr,
                                       weight_decay=config.optim.weight_decay)
    num_prototypes = config.model.num_prototypes
    self.log_prior = torch.full((num_prototypes,), -math.log(num_prototypes))
    self.center = torch.zeros(num_prototypes)
    self.frozen = config.optim.freeze_prototypes_epochs > 0  # the bench's steps are in epoch 0
    self.momentum = config.optim.teacher_momentum
    self.teacher_temp = config.objective.warmup_teacher_temp

  def _targets(self, teacher_logits: torch.Tensor) -> torch.Tensor:
    temp = self.teacher_temp
    if self.config.objective.normalization == 'center':
      targets = F.softmax((teacher_logits - self.center) / temp, dim=-1)
      momentum = self.config.objective.center_momentum
      self.center = momentum * self.center + (1 - momentum) * teacher_logits.mean(dim=0)
      return targets
    return F.softmax(teacher_logits / temp - self.log_prior, dim=-1)

  def _loss(self, targets: torch.Tensor, student_logits: torch.Tensor,
            num_global: int) -> torch.Tensor:
    """DINO's multi-crop cross-entropy over every (global view i, view v != i) pair; logits
    are view-major [V * B, K], as the crops were concatenated."""
    log_student = F.log_softmax(student_logits / self.config.objective.student_temp, dim=-1)
    targets_by_view = targets.chunk(num_global)
    student_by_view = log_student.chunk(student_logits.shape[0] // targets_by_view[0].shape[0])
    total, pairs = 0.0, 0
    for i, target in enumerate(targets_by_view):
      for v, log_probs in enumerate(student_by_view):
        if v != i:
          total = total + torch.sum(-target * log_probs, dim=-1).mean()
          pairs += 1
    return total / pairs

  def _clip_and_freeze(self):
    clip = self.config.optim.clip_grad
    for name, param in self.student.named_parameters():
      if param.grad is None:
        continue
      if clip > 0:
        norm = param.grad.norm(2)
        param.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))
      if self.frozen and name.startswith('head.last_layer'):
        param.grad = None

  def step(self, global_crops: torch.Tensor, local_crops: torch.Tensor) -> float:
    views = [_view_major(global_crops)]
    if local_crops.shape[1]:
      views.append(_view_major(local_crops))
    with torch.no_grad():
      targets = self._targets(self.teacher(views[:1]))
    student_logits = self.student(views)
    loss = self._loss(targets, student_logits, global_crops.shape[1])
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self._clip_and_freeze()
    self.optimizer.step()
    with torch.no_grad():
      teacher_params = list(self.teacher.parameters())
      torch._foreach_mul_(teacher_params, self.momentum)
      torch._foreach_add_(teacher_params, [p.detach() for p in self.student.parameters()],
                          alpha=1 - self.momentum)
    return float(loss.detach())


def _view_major(crops: torch.Tensor) -> torch.Tensor:
  """[B, V, H, W, C] -> [V * B, C, H, W]: DINO's crops of one resolution, view after view."""
  batch, views = crops.shape[:2]
  return crops.transpose(0, 1).reshape(views * batch, *crops.shape[2:]).permute(0, 3, 1,
                                                                                2).contiguous()
