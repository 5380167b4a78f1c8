"""The PyTorch baseline of `python -m kldino.bench --baseline=torch`: kldino's train step written
the way the official DINO, DINOv2 and DINOv3 train (eager PyTorch, main_dino.py's and
ssl_meta_arch.py's order of operations), so that the benchmark puts kldino's step next to what its
users would otherwise run, in one process.

One step as kldino/core/step.py's: the teacher on the global crops -> image targets (`prior`,
`center` or `sinkhorn`; with iBOT also the masked patches' targets) -> the student on every crop
(one backbone call per resolution, the mask token at masked patches of the global crops) -> the
multi-crop cross-entropy (+ iBOT's masked-patch cross-entropy, + KoLeo) -> backward -> the
prototypes' gradient dropped while frozen -> gradients clipped per parameter (DINO), per module
(DINOv2, DINOv3) or globally -> AdamW with DINOv2's parameter groups (layer-wise lr decay, the
patch embedding's lr multiplier; no weight decay on biases and 1-D parameters, DINO's rule, which
picks the same parameters as DINOv2's name rule in these models) -> the teacher's EMA. The models
are kldino/tools/torch_models.py's. Needs the `torch` extra.
"""
from __future__ import annotations

import collections
import math

import torch
import torch.nn.functional as F
from torch import nn

from kldino.core.schedules import LR_SCALINGS
from kldino.data import masking
from kldino.models.vit import VIT_SIZES
from kldino.tools.torch_models import dino_head, vision_transformer

NORMALIZATIONS = ('prior', 'center')
CLIP_MODES = ('per_param', 'per_module', 'global')
# The ViT's parameters before its first block: DINOv2's layer 0 of the layer-wise lr decay.
_EMBEDDINGS = ('pos_embed', 'patch_embed', 'mask_token', 'cls_token', 'register_tokens')


def _check_normalization(objective_config, key: str) -> list[str]:
  normalization = objective_config[key]
  if normalization in ('center', 'sinkhorn') or (normalization == 'prior' and
                                                 objective_config.prior_source == 'sweep'):
    return []
  return [
      f"objective.{key}='{normalization}' ('prior' from the prior pass, 'center' or 'sinkhorn')"
  ]


# What the baseline's ViT builds of DINOv3's options: RoPE without training-time augmentations
# (rope_shift_coords, rope_jitter_coords, rope_rescale_coords), mask_k_bias, norm_eps, mlp_ratio.
_DINOV3_VIT = (0.0, 0.0, 0.0, False, 1e-6, 4.0)


def check_config(config):
  """ValueError naming what the baseline does not build (it mirrors the bench presets' step)."""
  model, objective = config.model, config.objective
  problems = []
  if model.name not in VIT_SIZES or model.stem != 'patch':
    problems.append(f"model.name='{model.name}', model.stem='{model.stem}' (a ViT: "
                    f"{', '.join(VIT_SIZES)}, with the 'patch' stem)")
  if model.compute_dtype != 'float32':
    problems.append(f"model.compute_dtype='{model.compute_dtype}' ('float32')")
  if (model.rope_shift_coords, model.rope_jitter_coords, model.rope_rescale_coords,
      model.mask_k_bias, model.norm_eps, model.mlp_ratio) != _DINOV3_VIT:
    problems.append("DINOv3's ViT options (model.rope_shift_coords, rope_jitter_coords, "
                    'rope_rescale_coords, mask_k_bias, norm_eps, mlp_ratio: 0, 0, 0, False, '
                    '1e-6, 4.0)')
  if model.head_norm != 'none' or model.prototypes != 'learned':
    problems.append(f"model.head_norm='{model.head_norm}', model.prototypes='{model.prototypes}' "
                    "('none' and 'learned': DINO's head)")
  problems += _check_normalization(objective, 'normalization')
  if masking.used(objective):
    problems += _check_normalization(objective, 'patch_normalization')
  if config.optim.clip_mode not in CLIP_MODES:
    problems.append(f"optim.clip_mode='{config.optim.clip_mode}' ({', '.join(CLIP_MODES)})")
  if problems:
    raise ValueError("the PyTorch baseline builds DINO's, DINOv2's and DINOv3's step on a ViT; "
                     'this config has ' + '; '.join(problems))


class DinoModel(nn.Module):
  """Backbone + head (+ iBOT's separate `patch_head`): each resolution's crops through the
  backbone in one call and the head on all of them, as DINO's MultiCropWrapper."""

  def __init__(self, config, in_channels: int):
    super().__init__()
    self.backbone = vision_transformer(config.model, in_channels, config.aug.global_size)
    self.head = dino_head(config.model)
    if masking.used(config.objective) and config.objective.ibot.separate_head:
      self.patch_head = dino_head(config.model)

  def forward(self, crops: list[torch.Tensor], masks=None, *, mask_inputs: bool = False):
    """crops: one [V_r * B, C, H_r, W_r] tensor per resolution, the global crops first; masks
    [G * B, N] (bool) or None. Returns (CLS logits [sum V_r B, K], the global crops' backbone
    CLS [G * B, D], the masked patches' logits [masked, K] or None); with `mask_inputs` the
    global crops see the mask token at masked patches (the student), else not (the teacher)."""
    if masks is None:
      global_cls, patch_logits = self.backbone(crops[0]), None
    else:
      global_cls, patches = self.backbone.forward_tokens(crops[0], masks if mask_inputs else None)
      patch_logits = getattr(self, 'patch_head', self.head)(patches[masks])
    features = torch.cat([global_cls] + [self.backbone(images) for images in crops[1:]])
    return self.head(features), global_cls, patch_logits


def _lr_multiplier(name: str, depth: int, optim_config) -> float:
  """DINOv2's get_vit_lr_decay_rate and patch_embed_lr_mult for a parameter `name` of a
  submodule with `depth` blocks (0: a head, whose parameters all get 1)."""
  layer = depth + 1
  if depth and name.split('.')[0] in _EMBEDDINGS:
    layer = 0
  elif depth and name.startswith('blocks.'):
    layer = int(name.split('.')[1]) + 1
  rate = optim_config.layerwise_decay**(depth + 1 - layer)
  return rate * (optim_config.patch_embed_lr_mult if 'patch_embed' in name else 1.0)


def _param_groups(model: nn.Module, optim_config, lr: float) -> list[dict]:
  """The student's parameters grouped, as DINOv2 fuses them, by (lr multiplier, decayed)."""
  groups = collections.defaultdict(list)
  for module in model.children():
    depth = len(module.blocks) if hasattr(module, 'blocks') else 0
    for name, param in module.named_parameters():
      decayed = not (name.endswith('.bias') or param.ndim == 1)
      groups[(_lr_multiplier(name, depth, optim_config), decayed)].append(param)
  return [{
      'params': params,
      'lr': lr * multiplier,
      'weight_decay': optim_config.weight_decay if decayed else 0.0
  } for (multiplier, decayed), params in groups.items()]


def koleo(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
  """DINOv2's KoLeo estimator: -mean log distance of each unit row to its nearest other row."""
  unit = F.normalize(embeddings, p=2, dim=-1, eps=eps)
  with torch.no_grad():
    similarity = unit @ unit.t()
    similarity.fill_diagonal_(-1.0)
    nearest = similarity.argmax(dim=1)
  distances = torch.linalg.vector_norm(unit - unit[nearest] + eps, dim=-1)
  return -torch.log(distances + eps).mean()


def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, iterations: int):
  """DINOv2's and DINOv3's sinkhorn_knopp_teacher: exp(t / tau) made doubly stochastic over the
  rows given (every prototype 1 / K of the mass, every row 1 / rows), rows summing to one."""
  q = torch.exp(teacher_logits / teacher_temp).t()  # [K, rows]
  prototypes, rows = q.shape
  q = q / q.sum()
  for _ in range(iterations):
    q = q / q.sum(dim=1, keepdim=True) / prototypes
    q = q / q.sum(dim=0, keepdim=True) / rows
  return (q * rows).t()


class TorchDinoStep:
  """One training step of kldino's, in PyTorch. `step(global_crops, local_crops, masks=None)`
  takes NHWC tensors [B, V, H, W, C] (as kldino's batches; with iBOT the masks [B, G, N]) and
  returns the loss (a float)."""

  def __init__(self, config, in_channels: int, *, seed: int = 0):
    check_config(config)
    torch.manual_seed(seed)
    self.config = config
    self.ibot = masking.used(config.objective)
    self.student = DinoModel(config, in_channels)
    self.teacher = DinoModel(config, in_channels)
    self.teacher.load_state_dict(self.student.state_dict())
    self.teacher.requires_grad_(False)
    optim = config.optim
    lr = optim.lr * LR_SCALINGS[optim.lr_scaling](config.batch_size)
    self.optimizer = torch.optim.AdamW(_param_groups(self.student, optim, lr), lr=lr)
    num_prototypes = config.model.num_prototypes
    self.norm_state = {
        kind: {
            'log_prior': torch.full((num_prototypes,), -math.log(num_prototypes)),
            'center': torch.zeros(num_prototypes)
        } for kind in ('image', 'patch')
    }
    self.frozen = optim.freeze_prototypes_epochs > 0  # the bench's steps are in epoch 0
    self.momentum = optim.teacher_momentum
    self.teacher_temp = config.objective.warmup_teacher_temp

  def _targets(self, teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The targets of the image (`kind` 'image') or patch teacher; updates its center."""
    objective, state, temp = self.config.objective, self.norm_state[kind], self.teacher_temp
    normalization = objective.normalization if kind == 'image' else objective.patch_normalization
    if normalization == 'prior':
      return F.softmax(teacher_logits / temp - state['log_prior'], dim=-1)
    if normalization == 'sinkhorn':
      return sinkhorn_knopp(teacher_logits, temp, objective.sinkhorn_iters)
    targets = F.softmax((teacher_logits - state['center']) / temp, dim=-1)
    momentum = objective.center_momentum
    state['center'] = momentum * state['center'] + (1 - momentum) * teacher_logits.mean(dim=0)
    return targets

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

  def _ibot_loss(self, patch_targets, student_patch_logits, masks) -> torch.Tensor:
    """DINOv2's masked-patch loss: each masked patch's cross-entropy weighted by 1 / its crop's
    masked patches, summed, over the number of global crops."""
    log_student = F.log_softmax(student_patch_logits / self.config.objective.student_temp, dim=-1)
    per_patch = torch.sum(-patch_targets * log_student, dim=-1)
    crop_weights = 1.0 / masks.sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.sum(per_patch * crop_weights.expand_as(masks)[masks]) / masks.shape[0]

  def _koleo_loss(self, global_cls: torch.Tensor, num_global: int) -> torch.Tensor:
    """KoLeo per global crop (never between the crops of one image), per group of images,
    averaged over groups and summed over crops."""
    total = 0.0
    for view in global_cls.chunk(num_global):
      groups = view.split(self.config.objective.koleo_group_size or view.shape[0])
      total = total + sum(koleo(group) for group in groups) / len(groups)
    return total

  def _clip_and_freeze(self):
    """The prototypes' gradient dropped while frozen (before any norm counts it), then clipped."""
    for name, param in self.student.named_parameters():
      if self.frozen and name.split('.')[1:2] == ['last_layer']:
        param.grad = None
    clip, mode = self.config.optim.clip_grad, self.config.optim.clip_mode
    if clip <= 0:
      return
    if mode == 'global':
      nn.utils.clip_grad_norm_(self.student.parameters(), clip)
    for module in self.student.children() if mode == 'per_module' else ():
      nn.utils.clip_grad_norm_(module.parameters(), clip)
    for param in self.student.parameters() if mode == 'per_param' else ():
      if param.grad is not None:
        norm = param.grad.norm(2)
        param.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))

  def _student_loss(self, views, masks, targets, patch_targets, num_global):
    objective = self.config.objective
    student_logits, global_cls, patch_logits = self.student(views, masks, mask_inputs=True)
    loss = self._loss(targets, student_logits, num_global)
    if self.ibot:
      loss = loss + objective.ibot.loss_weight * self._ibot_loss(patch_targets, patch_logits, masks)
    if objective.koleo_weight:
      loss = loss + objective.koleo_weight * self._koleo_loss(global_cls, num_global)
    return loss

  def step(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks=None) -> float:
    num_global = global_crops.shape[1]
    views = [_view_major(global_crops)]
    if local_crops.shape[1]:
      views.append(_view_major(local_crops))
    masks = masks.transpose(0, 1).reshape(-1, masks.shape[-1]) if self.ibot else None
    with torch.no_grad():
      teacher_logits, _, teacher_patch_logits = self.teacher(views[:1], masks)
      targets = self._targets(teacher_logits, 'image')
      patch_targets = self._targets(teacher_patch_logits, 'patch') if self.ibot else None
    loss = self._student_loss(views, masks, targets, patch_targets, num_global)
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
