"""DINOv2's objective on the embedded `digits`, on a CPU: configs/digits.py with iBOT on the
global crops' 4 x 4 patches (the mask token; the DINO head gives the patch logits), KoLeo on the
student's CLS, and the prior on image and patch targets.

    python -m kldino.main --config=configs/digits_dinov2.py --workdir=/tmp/kldino_digits_dinov2

`--config.objective.patch_normalization=center` (or sinkhorn) normalises the patch targets as
DINOv2 does; `--config.objective.ibot.loss_weight=0 --config.objective.koleo_weight=0` is
configs/digits.py itself. What each gave: docs/results.md ("The DINOv2 objective on the digits").
"""
from configs import digits


def get_config(arg=None):
  config = digits.get_config(arg)
  config.model.mask_token = True
  config.objective.ibot.loss_weight = 1.0
  config.objective.patch_normalization = 'prior'
  config.objective.koleo_weight = 0.1
  return config
