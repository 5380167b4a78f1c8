"""DINOv3's ImageNet-1k recipe (ViT-L/16 with RoPE, 82.2 % k-NN / 83.3 % linear in the file's
header), and the same recipe with the paper's inverse-prior teacher (`:prior`).

Every value is the official run's: `dinov3/configs/train/vitl_im1k_lin834.yaml` (on
`dinov3/configs/ssl_default_config.yaml`; tests/configs/test_recipe.py checks each against its
source), 64 images on each of 32 GPUs: ViT-L/16 with rotary position embeddings (base 100,
coordinates normalised per axis), LayerScale 1e-5, drop path 0.3 in every block; a DINO head and
a separate iBOT head (65536 x 256 x 2048 x 3, a learnable gain per prototype), iBOT on half the
global crops with mask ratios 0.1-0.5, KoLeo 0.1 per GPU's 64 images; image and patch targets
normalised by Sinkhorn-Knopp (3 iterations); AdamW, lr 1e-3 per 1024 images with square-root
scaling after a linear warm-up, cosine to 1e-6, layer-wise decay 0.9, patch embedding x 0.2;
weight decay 0.04 -> 0.4; teacher momentum 0.992 -> 1; teacher temperature 0.04 -> 0.07 (linear
per step); each module's gradient clipped to norm 3.0; crops 2 x 224 (0.32, 1) and 8 x 96
(0.05, 0.32). DINOv3's 100 "epochs" of 1250 iterations at batch 2048 are 200 ImageNet epochs of
625 steps here, so its epoch-valued settings double (warm-up 20, teacher warm-up 60, last layer
frozen 2). Mixed precision: bf16 compute with float32 parameters (DINOv3: bf16 parameters with
fp32 reductions).

    python -m kldino.main --config=configs/imagenet_dinov3_vitl16.py --workdir=DIR ...
    python -m kldino.main --config=configs/imagenet_dinov3_vitl16.py:prior --workdir=DIR ...

`:prior` replaces Sinkhorn-Knopp by the prior from a pass over the whole dataset every epoch, on
the image and the patch targets: the method at the state of the art.
"""
from configs import imagenet_dinov2_vitl16

VARIANTS = ('', 'prior')


def get_config(arg=None):
  """DINOv3's recipe; with arg 'prior' the dataset prior in place of Sinkhorn-Knopp."""
  arg = arg or ''
  if arg not in VARIANTS:
    raise ValueError(f"configs/imagenet_dinov3_vitl16.py takes no argument or ':prior', got "
                     f"{arg!r}")
  config = imagenet_dinov2_vitl16.get_config()  # DINOv2's data, crops, head and schedules
  config.model.update(pos_embed='rope',
                      rope_base=100.0,
                      rope_normalize_coords='separate',
                      pos_interpolation='jax',
                      interpolate_offset=0.0)
  config.objective.ibot.separate_head = True
  normalization = 'prior' if arg == 'prior' else 'sinkhorn'
  config.objective.normalization = normalization
  config.objective.patch_normalization = normalization
  config.optim.lr = 1e-3
  return config
