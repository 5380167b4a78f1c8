"""kldino: self-supervised pretraining by clustering, with the teacher's targets normalised by the
inverse cluster prior of the whole training set (see README.md)."""
import os

# XLA:CPU fuses reductions into its YNNPACK matmul fusions by default; a reduction in a matmul's
# prologue is then recomputed for every tile of the matmul. The prototype weight norm
# (models/head.py) fused that way took 3.8 s of a 5.3 s ViT-S/16 sweep batch. Without reduction
# fusions (measured with `python -m kldino.bench --profile`): the small224 step 7.9 -> 3.7 s, its
# sweep 6.0 -> 24 images/s; the tiny32 step 3.70 -> 3.47 s. Set before JAX creates its CPU
# backend (importing kldino first is enough); an explicit setting in XLA_FLAGS wins.
_YNN_FUSION_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
if _YNN_FUSION_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --{_YNN_FUSION_FLAG}=-reduce".strip()
