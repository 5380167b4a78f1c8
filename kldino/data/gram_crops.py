"""Whether and at what size batches carry DINOv3's Gram teacher crops (dinov3/data/augmentations.py
with gram_teacher_no_distortions: the global crops' windows and flips cut at the Gram teacher's
size, without colour distortions; kldino/data/augment.py cuts them)."""
from __future__ import annotations


def size(config) -> int:
  """gram.teacher_resolution_scale x aug.global_size, rounded, when batches carry Gram teacher
  crops (gram.use and gram.undistorted); else 0."""
  if not (config.gram.use and config.gram.undistorted):
    return 0
  return int(round(config.gram.teacher_resolution_scale * config.aug.global_size))
