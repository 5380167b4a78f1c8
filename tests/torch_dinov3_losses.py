"""DINOv3's Gram anchoring in plain PyTorch, written here from facebookresearch/dinov3
(dinov3/loss/gram_loss.py: GramLoss.forward; dinov3/train/ssl_meta_arch.py:
get_gram_teacher_output's resize of the Gram teacher's patch features): the reference for
kldino/core/objective.py:gram_loss and kldino/models/layers.py:resize_patch_grid.

Checked against the official code: the features are cast to float32 and L2-normalised along the
feature axis (F.normalize) when `apply_norm`; without `img_level` a [B, N, D] input is flattened
to [B * N, D] before the similarities; the negative entries are cleared in place (the teacher's
first, so that remove_only_teacher_neg's student condition, which reads the cleared teacher
matrix, never holds); the loss is nn.MSELoss (the mean over every entry).
"""
import torch
import torch.nn.functional as F


def gram_loss(output_feats,
              target_feats,
              *,
              apply_norm=True,
              img_level=True,
              remove_neg=False,
              remove_only_teacher_neg=False):
  """GramLoss(apply_norm, remove_neg, remove_only_teacher_neg)(output, target, img_level)."""
  if remove_neg or remove_only_teacher_neg:
    assert remove_neg != remove_only_teacher_neg
  output_feats, target_feats = output_feats.float(), target_feats.float()
  if apply_norm:
    target_feats = F.normalize(target_feats, dim=-1)
  if not img_level and target_feats.dim() == 3:
    target_feats = target_feats.flatten(0, 1)
  target_sim = target_feats @ target_feats.transpose(-1, -2)
  if apply_norm:
    output_feats = F.normalize(output_feats, dim=-1)
  if not img_level and output_feats.dim() == 3:
    output_feats = output_feats.flatten(0, 1)
  student_sim = output_feats @ output_feats.transpose(-1, -2)
  if remove_neg:
    target_sim[target_sim < 0] = 0.0
    student_sim[student_sim < 0] = 0.0
  elif remove_only_teacher_neg:
    target_sim[target_sim < 0] = 0.0
    student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
  return torch.nn.MSELoss()(student_sim, target_sim)


def resize_gram_teacher_patches(teacher_patches, student_side, *, mode='bicubic', antialias=False):
  """The Gram teacher's patch features [B, N * N, D] resized to the student's grid, [B, n * n, D]:
  to [B, D, N, N], interpolate(size=(n, n), align_corners=False), back to tokens."""
  side = int(round(teacher_patches.shape[1]**0.5))
  grid = teacher_patches.transpose(-2, -1).unflatten(-1, (side, side))
  resized = F.interpolate(grid,
                          size=(student_side, student_side),
                          mode=mode,
                          align_corners=False,
                          antialias=antialias)
  return resized.flatten(-2, -1).transpose(-2, -1)
