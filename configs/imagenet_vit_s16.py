"""DINO's ViT-S/16 ImageNet-1k recipe (100 epochs), with the paper's inverse-prior teacher.

Every value is the official run's: `python -m torch.distributed.launch --nproc_per_node=8
main_dino.py --arch vit_small` (README, "Vanilla DINO training"), i.e. main_dino.py's argparse
defaults on 8 GPUs x 64 images (tests/configs/test_recipe.py checks each against its source):
AdamW, lr 5e-4 per 256 images (1e-3 at batch 512) after a 10-epoch linear warmup, cosine to 1e-6;
weight decay 0.04 -> 0.4 (cosine); teacher momentum 0.996 -> 1 (cosine); teacher temperature 0.04
throughout (warmup_teacher_temp = teacher_temp = 0.04, no warmup epochs); student temperature
0.1; each parameter's gradient clipped to norm 3.0; the last layer frozen in epoch 0; drop path
0.1; 2 x 224 crops of scale (0.4, 1) and 8 x 96 of scale (0.05, 0.4) with DataAugmentationDINO's
flip / colour jitter / grayscale / blur / solarisation; head 2048 -> 2048 -> 256 with GELU, no
normalisation layers, DINO's init, K = 65536 weight-normalised prototypes with the norm fixed at 1
(norm_last_layer). DINO's longer "boosted" run is configs/imagenet_vit_s16_boost.py.

The one kldino choice: the teacher's normalisation is the prior from a pass over the whole dataset
every epoch; `--config.objective.normalization=center` gives DINO itself (centering, momentum 0.9).
DINO trains in fp16 autocast; this recipe computes in float32 (`--config.model.compute_dtype=
bfloat16` for mixed precision, as configs/imagenet_scale.py does).

    python -m kldino.main --config=configs/imagenet_vit_s16.py --workdir=gs://BUCKET/run \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""
from kldino.config.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.num_epochs = 100
  config.batch_size = 512  # DINO: 64 per GPU on 8 GPUs
  config.log_every_steps = 100

  config.data.name = 'imagenet2012'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.image_size = 224
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  # TFDS reads its records in order: a buffer of 50k examples. DINO's full permutation per epoch
  # ('permutation') needs the images read by position: data.name='folder'.
  config.data.shuffle = 'buffer'
  config.data.shuffle_buffer = 50_000

  config.aug.global_size = 224
  config.aug.local_size = 96
  config.aug.num_local = 8
  config.aug.global_scale = (0.4, 1.0)
  config.aug.local_scale = (0.05, 0.4)
  config.aug.flip = True
  config.aug.color_jitter = (0.4, 0.4, 0.2, 0.1)
  config.aug.color_jitter_prob = 0.8
  config.aug.grayscale_prob = 0.2
  config.aug.blur_prob = (1.0, 0.1, 0.5)
  config.aug.blur_sigma = (0.1, 2.0)
  config.aug.solarize_prob = 0.2

  config.model.name = 'vit_small'
  config.model.patch_size = 16
  config.model.drop_path = 0.1
  config.model.num_prototypes = 65536
  config.model.head_hidden_dim = 2048
  config.model.head_bottleneck_dim = 256
  config.model.head_num_layers = 3
  config.model.head_norm = 'none'  # DINO: use_bn_in_head False
  config.model.head_init = 'dino'  # MLP kernels normal(0, .02), zero biases
  config.model.prototypes = 'learned'
  config.model.prototype_init_std = 0.0  # DINO's nn.Linear default: uniform(+-1/sqrt(256))
  config.model.norm_last_layer = True

  config.objective.normalization = 'prior'
  config.objective.prior_source = 'sweep'
  config.objective.prior_every_epochs = 1
  config.objective.center_momentum = 0.9  # for normalization=center (DINO's)
  config.objective.student_temp = 0.1
  config.objective.warmup_teacher_temp = 0.04
  config.objective.teacher_temp = 0.04
  config.objective.warmup_teacher_temp_epochs = 0

  config.optim.lr = 5e-4
  config.optim.min_lr = 1e-6
  config.optim.warmup_epochs = 10
  config.optim.weight_decay = 0.04
  config.optim.weight_decay_end = 0.4
  config.optim.clip_grad = 3.0
  config.optim.clip_mode = 'per_param'
  config.optim.freeze_prototypes_epochs = 1
  config.optim.teacher_momentum = 0.996
  config.optim.teacher_momentum_end = 1.0

  config.eval.batch_size = 1024
  config.prior_pass_batch_size = 1024
  # DINO's evaluation: k-NN with k in (10, 20, 100, 200); the linear evaluation on the CLS tokens
  # of the last 4 blocks, lr 1e-3 x 1024 / 256 (here with DINOv2's grid around it), 100 epochs.
  config.eval.knn_k = (10, 20, 100, 200)
  config.eval.n_last_blocks = 4
  config.eval.linear_lrs = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
  config.eval.linear_batch_size = 1024
  # The quick feature probe gathers features to the host: at ImageNet scale, --mode=linear_eval.
  del config.evals['linear_probe']
  return config
