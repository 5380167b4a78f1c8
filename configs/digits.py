"""KL-DINO on the embedded `digits` dataset (sklearn's 8x8 digits as a TFDS dataset): runs on a CPU.

    python -m kldino.main --config=configs/digits.py --workdir=/tmp/kldino_digits

Small data wants a small head (NOTES.md, "A throwaway prototype"): a 32-d bottleneck, batch
statistics inside the head MLP and K=256 prototypes keep the teacher logits spread compared with
tau_t, so that the targets are informative from the first step. The backbone is a small residual
CNN; digits are upsampled to 16x16 for the global crops (8x8 local crops).
"""
from kldino.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  # 10 epochs keep `make pretrain` (install included) under 15 minutes on 2 CPU cores.
  config.num_epochs = 10
  config.eval.baselines = True  # report raw pixels and the backbone at init beside the result
  return config
