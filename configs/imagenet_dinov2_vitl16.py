"""DINOv2's ImageNet-1k recipe (ViT-L/16, 81.6 % k-NN / 82.9 % linear in the DINOv2 README), with
the paper's inverse-prior teacher on image and patch targets.

Every value is the official run's: `dinov2/configs/train/vitl16_short.yaml` on
`dinov2/configs/ssl_default_config.yaml`, on 32 GPUs x 64 images (tests/configs/test_recipe.py
checks each against its source): ViT-L/16 with LayerScale 1e-5, drop path 0.3 in every block,
DINOv2's position-embedding interpolation (offset 0.1); DINO head and iBOT on the same head
(65536 x 256 x 2048 x 3, a learnable gain per prototype), iBOT on half the global crops with mask
ratios 0.1-0.5, KoLeo 0.1 per GPU's 64 images; AdamW, lr 4e-3 per 1024 images with square-root
scaling after a linear warm-up, cosine to 1e-6, layer-wise decay 0.9, patch embedding x 0.2;
weight decay 0.04 -> 0.4; teacher momentum 0.992 -> 1; teacher temperature 0.04 -> 0.07 (linear
per step); each module's gradient clipped to norm 3.0; crops 2 x 224 (0.32, 1) and 8 x 96
(0.05, 0.32). DINOv2's 100 "epochs" of 1250 iterations at batch 2048 are 200 ImageNet epochs of
625 steps here, so its epoch-valued settings double (warm-up 20, teacher warm-up 60, last layer
frozen 2).

The kldino choice: the image and the patch teachers are normalised by the prior from a pass over
the whole dataset every epoch; `--config.objective.normalization=center
--config.objective.patch_normalization=center` gives DINOv2's centering. Mixed precision: bf16
compute with float32 parameters (DINOv2: fp16 parameters with fp32 reductions).
"""
from configs import imagenet_vit_s16


def get_config(arg=None):
  """DINO's ImageNet recipe (its data, crops' sizes and augmentation, head sizes and init, the
  prior) with what DINOv2 changes."""
  config = imagenet_vit_s16.get_config(arg)
  config.num_epochs = 200  # DINOv2: 100 x OFFICIAL_EPOCH_LENGTH 1250 iterations at batch 2048
  config.batch_size = 2048  # 64 per GPU on 32 GPUs
  config.aug.global_scale = (0.32, 1.0)
  config.aug.local_scale = (0.05, 0.32)

  config.model.update(name='vit_large',
                      drop_path=0.3,
                      drop_path_uniform=True,
                      layerscale=1e-5,
                      mask_token=True,
                      pos_interpolation='torch',
                      interpolate_offset=0.1,
                      compute_dtype='bfloat16',
                      remat=True,
                      norm_last_layer=False)  # DINOv2's DINOHead: weight_g is trained

  config.objective.patch_normalization = 'prior'
  config.objective.update(teacher_temp=0.07,
                          warmup_teacher_temp_epochs=60,
                          teacher_temp_warmup='per_step')
  config.objective.ibot.loss_weight = 1.0
  config.objective.koleo_weight = 0.1
  config.objective.koleo_group_size = 64

  config.optim.update(lr=4e-3,
                      lr_scaling='sqrt_wrt_1024',
                      warmup_epochs=20,
                      clip_mode='per_module',
                      freeze_prototypes_epochs=2,
                      teacher_momentum=0.992,
                      layerwise_decay=0.9,
                      patch_embed_lr_mult=0.2)
  config.mesh.fsdp = 8

  # DINOv2's evaluation (dinov2/eval/knn.py, linear.py): k-NN with k in (10, 20, 100, 200) at
  # T = 0.07; linear heads over its grid of learning rates, here on the CLS and the average
  # patch token of the last block (DINOv2 also tries 4 blocks and picks the best).
  config.eval.n_last_blocks = 1
  config.eval.avgpool_patchtokens = True
  config.eval.linear_lrs = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2,
                            1e-1)
  return config
