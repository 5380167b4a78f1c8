"""DINOv3's objective on the embedded `digits`, on a CPU: configs/digits_dinov2.py with DINOv3's
changes (configs/imagenet_dinov3_vitl16.py): rotary position embeddings instead of the learned
table, iBOT on a separate head, and Sinkhorn-Knopp on image and patch targets.

    python -m kldino.main --config=configs/digits_dinov3.py --workdir=/tmp/kldino_digits_dinov3

`:prior` puts the dataset prior in place of Sinkhorn-Knopp (image and patch targets);
`--config.model.pos_embed=learned` gives the learned table back; `--config.gram.use=True` adds
Gram anchoring. What each gave: docs/results.md ("The DINOv3 objective on the digits").
"""
from configs import digits_dinov2


def get_config(arg=None):
  """DINOv3's objective; with arg 'prior' the dataset prior in place of Sinkhorn-Knopp."""
  if arg not in (None, '', 'prior'):
    raise ValueError(f"configs/digits_dinov3.py takes no argument or ':prior', got {arg!r}")
  config = digits_dinov2.get_config()
  config.model.pos_embed = 'rope'
  config.objective.ibot.separate_head = True
  normalization = 'prior' if arg == 'prior' else 'sinkhorn'
  config.objective.normalization = normalization
  config.objective.patch_normalization = normalization
  return config
