"""A config for each published backbone, by name, so that importing one needs no config of your
own:

    python -m kldino.main --mode=import --config=configs/pretrained.py:dinov2_vits14_reg \
        --workdir=DIR --import_from=dinov2_vits14_reg4_pretrain.pth
    python -m kldino.main --mode=linear_eval --workdir=DIR     # then any mode on it

NAME is one of kldino/models/hub.py's HUB_MODELS: dino_vits16, dino_vits8, dino_vitb16,
dino_vitb8 (DINO), dinov2_vit{s,b,l,g}14 and their _reg variants (DINOv2), dinov3_vits16,
dinov3_vits16plus, dinov3_vitb16, dinov3_vitl16 (DINOv3). The model is the hub entry's (its
LayerScale, feed-forward, registers, mask token, and the resizing of the position table, or
DINOv3's RoPE, masked key bias and LayerNorm epsilon); aug.global_size is the table's grid, 224
px for DINO and 518 px for DINOv2, and 224 px for DINOv3 (RoPE has no table: any size works);
local crops are 96 px (98 for patch 14). The rest is DINO's ImageNet recipe and evaluation
(configs/imagenet_vit_s16.py) at 224 px.
"""
from configs import imagenet_vit_s16
from kldino.models import hub


def get_config(arg=None):
  """The config of hub model `arg`."""
  if arg not in hub.HUB_MODELS:
    raise ValueError(f"configs/pretrained.py needs ':NAME' with NAME in "
                     f"{', '.join(hub.HUB_MODELS)}, got {arg!r}")
  config = imagenet_vit_s16.get_config()
  model = dict(hub.HUB_MODELS[arg])
  config.aug.global_size = model.pop('image_size')
  patch_size = model['patch_size']
  config.aug.local_size = 96 if 96 % patch_size == 0 else 98  # DINO's 96, DINOv2's 98 px
  config.model.update(**model)
  return config
