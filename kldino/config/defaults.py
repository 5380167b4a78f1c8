"""The complete set of config keys with their defaults; experiment files in configs/ override.

Every key can be overridden on the command line: `--config.objective.normalization=center`.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_epochs = 60
  config.batch_size = 64  # global, over all devices and hosts
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500  # and always at the end and on SIGTERM / preemption
  config.keep_checkpoints = 3
  # WORKDIR[:STEP]: start from that run's checkpoint (its student, teacher and Gram teacher) with a
  # fresh optimizer, normalisation state, step 0 and schedules, at this config's crop sizes
  # (DINOv3's high-resolution phase; docs/checkpoints.md). '' : from scratch.
  config.init_from = ''

  config.data = ml_collections.ConfigDict()
  config.data.name = 'digits'  # 'digits', 'folder', or any TFDS name
  config.data.path = ''  # root of an ImageFolder tree, for name='folder'
  config.data.data_dir = ''  # TFDS data_dir ('' = TFDS default)
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.image_size = 16  # the evaluation view's size (a centre crop); training crops
  # are cut from the full-resolution image (small fixed-size
  # images, the 8x8 digits, are upscaled to this first)
  config.data.eval_resize = 0  # evaluation: shorter side resized to this, then the centre
  # image_size crop (DINO: 256 for 224); 0: image_size * 256 / 224
  # rounded (18 for the 16x16 view of the 8x8 digits)
  config.data.mean = (0.5,)  # per channel, after scaling to [0, 1]
  config.data.std = (0.5,)
  # The training order of each epoch: 'permutation' (DINO's DistributedSampler), each data
  # shard fully permuted (a folder by position; a source read in order, TFDS, through a shuffle
  # buffer of the whole shard, which must fit in memory); 'buffer', a shuffle buffer of
  # shuffle_buffer examples, for large datasets read in order.
  config.data.shuffle = 'permutation'
  config.data.shuffle_buffer = 4096
  config.data.shards = 0  # training data shards (0: one per process); fixing it makes
  # the batches independent of the number of processes
  config.data.prefetch = 2
  config.data.max_corrupt_fraction = 0.001  # images that cannot be decoded are skipped (and named
  # in a warning); more than this fraction of a split stops the run

  config.aug = ml_collections.ConfigDict()
  config.aug.global_size = 16
  config.aug.local_size = 8
  config.aug.num_local = 6
  config.aug.global_scale = (0.4, 1.0)
  config.aug.local_scale = (0.1, 0.4)
  config.aug.flip = False  # mirrored digits are other digits
  config.aug.color_jitter = (0.4, 0.4, 0.0, 0.0)  # brightness, contrast, saturation, hue
  config.aug.color_jitter_prob = 0.8
  config.aug.grayscale_prob = 0.0
  config.aug.blur_prob = (1.0, 0.1, 0.5)  # global 1, global 2, locals
  config.aug.blur_sigma = (0.1, 1.0)
  config.aug.solarize_prob = 0.2  # on global 2 only
  config.aug.crop_interpolation = 'bicubic'  # the crops' resize: DINO's bicubic, or bilinear
  config.aug.xla_min_size = 64  # global crops of at least this size are augmented on whole
  # batches by XLA (~7 ms per image for DINO's 224/96 crops
  # instead of ~60, after ~20 s of compilation); smaller ones
  # example by example in tf.data (kldino/data/augment.py)

  config.model = ml_collections.ConfigDict()
  config.model.name = 'convnet_small'
  config.model.patch_size = 4  # ViT only
  config.model.stem = 'patch'  # ViT only: 'patch' (linear, as DINO) or 'conv' (3x3 convs)
  config.model.drop_path = 0.1
  config.model.compute_dtype = 'float32'  # the backbone's arithmetic: 'float32' or 'bfloat16'
  config.model.remat = False  # recompute each block's activations in the backward pass
  # DINOv2's ViT options (kldino/models/vit.py); the defaults are DINO's ViT.
  config.model.layerscale = 0.0  # LayerScale's init value on each residual branch (0: none)
  config.model.ffn = 'mlp'  # 'mlp' or 'swiglu' (DINOv2's fused SwiGLU width)
  config.model.num_registers = 0  # register tokens after CLS (DINOv2 _reg models: 4)
  config.model.mask_token = False  # a learned token for masked patches (iBOT)
  config.model.drop_path_uniform = False  # the same drop path rate in every block (DINOv2)
  config.model.pos_interpolation = 'jax'  # 'jax' or 'torch' (DINO's, DINOv2's resize)
  config.model.interpolate_offset = 0.0  # 'torch': DINOv2's scale-factor offset (0.1)
  config.model.interpolate_antialias = False  # 'torch': antialias when shrinking (DINOv2 _reg)
  # DINOv3's ViT options (kldino/models/vit.py, rope.py); the defaults are DINO's and DINOv2's.
  config.model.pos_embed = 'learned'  # 'learned' (a table) or 'rope' (DINOv3: none, any size)
  config.model.rope_base = 100.0  # 'rope': the periods base^(4i / head_dim)
  config.model.rope_normalize_coords = 'separate'  # 'rope': coords / each axis, 'min' or 'max'
  config.model.rope_shift_coords = 0.0  # 'rope', training: shift in [-s, s] per axis (0: off)
  config.model.rope_jitter_coords = 0.0  # 'rope', training: x [1/j, j] per axis (0: off)
  config.model.rope_rescale_coords = 0.0  # 'rope', training: x [1/r, r] (0: off; DINOv3: 2)
  config.model.mask_k_bias = False  # the key third of the qkv bias zero (DINOv3)
  config.model.norm_eps = 1e-6  # the LayerNorms' epsilon (DINOv3's hub models: 1e-5)
  config.model.mlp_ratio = 4.0  # the feed-forward width / dim (DINOv3's ViT-S+: 6)
  config.model.num_prototypes = 256
  config.model.head_hidden_dim = 512
  config.model.head_bottleneck_dim = 32
  config.model.head_num_layers = 3
  config.model.head_norm = 'batch'  # 'none' (DINO), 'batch' or 'layer' inside the head MLP
  config.model.prototypes = 'learned'  # 'learned', 'fixed' or 'centered'
  # The head's init. 'dino' is DINO's (the ImageNet recipes): MLP kernels normal(0, .02) (DINO's
  # trunc_normal_, whose +-2 bounds never bite) and zero biases. 'lecun' (this digits default):
  # LeCun-normal kernels, which keep the logits' spread at init comparable with tau_t on small
  # data, where DINO's init leaves the centered targets nearly uniform.
  config.model.head_init = 'lecun'  # 'dino' or 'lecun'
  # The raw prototype directions (only their unit columns enter the logits, but their norm sets
  # the step of each update): 0 = DINO's, nn.Linear's uniform(+-1/sqrt(head_bottleneck_dim));
  # > 0 = a normal with this std (the digits runs: 1.0).
  config.model.prototype_init_std = 1.0
  # DINO's --norm_last_layer: True = the prototypes' norm is fixed at 1 (logits are cosines);
  # False = a learnable gain g_k per prototype, init 1 (DINO's weight_g), logits g_k cos(z, w_k);
  # needs prototypes='learned'. Frozen with the prototypes (optim.freeze_prototypes_epochs), as
  # DINO freezes its whole last layer.
  config.model.norm_last_layer = True

  config.objective = ml_collections.ConfigDict()
  config.objective.normalization = 'prior'  # prior | center | sinkhorn | teacher_bn | none
  config.objective.prior_source = 'sweep'  # sweep (the prior pass over the dataset) | batch | ema
  config.objective.prior_every_epochs = 1  # T
  config.objective.prior_init = 'sweep'  # sweep (a prior pass before step 0) | uniform
  config.objective.prior_eps = 1e-6  # floor of Q(k) before renormalising
  config.objective.prior_momentum = 0.9  # source=ema
  config.objective.gap_examples = 10_000  # Jensen gap in a prior pass: first N examples (0: all)
  config.objective.center_momentum = 0.9
  config.objective.sinkhorn_iters = 3
  config.objective.student_temp = 0.1
  config.objective.teacher_temp = 0.04
  config.objective.warmup_teacher_temp = 0.04
  config.objective.warmup_teacher_temp_epochs = 0
  # 'per_epoch': DINO's linspace, constant within an epoch; 'per_step': DINOv2's linear ramp
  config.objective.teacher_temp_warmup = 'per_epoch'
  # DINOv2's terms (docs/method.md): iBOT's masked-patch loss on the global crops (loss_weight 0:
  # off; needs model.mask_token) with DINOv2's block masks, and KoLeo on the student's CLS.
  config.objective.ibot = ml_collections.ConfigDict()
  config.objective.ibot.loss_weight = 0.0
  config.objective.ibot.separate_head = False  # False: the DINO head also gives patch logits
  config.objective.ibot.mask_sample_probability = 0.5  # the share of global crops masked
  config.objective.ibot.mask_ratio_min_max = (0.1, 0.5)  # their masked shares, spread
  config.objective.ibot.mask_group_size = 0  # images masked together (0: each device's share)
  # The patch targets' normalisation, from the same registry as the image targets' (with the
  # same prior_source, prior_every_epochs, ...): a prior over patch prototypes, center, sinkhorn.
  config.objective.patch_normalization = 'prior'
  config.objective.koleo_weight = 0.0  # DINOv2: 0.1
  config.objective.koleo_group_size = 0  # images per KoLeo group (0: the global batch)

  # DINOv3's Gram anchoring (dinov3/loss/gram_loss.py, docs/method.md): the student's patch
  # similarities on the global crops pulled towards those of the Gram teacher, a frozen copy of
  # the EMA teacher's backbone. Off by default (the state then holds no Gram teacher).
  config.gram = ml_collections.ConfigDict()
  config.gram.use = False
  config.gram.loss_weight = 1.0  # DINOv3's gram anchoring: 2.0; high-resolution phase: 1.5
  config.gram.ramp_steps = 0  # the weight rises 0 -> loss_weight along half a cosine over these
  # steps from start_step (DINOv3's loss_weight_schedule); 0: at once
  config.gram.start_step = 0  # the Gram teacher is the EMA teacher of this step; the loss counts
  # from it on (0 before)
  config.gram.refresh_every = 0  # then copied again every N steps (0: never; DINOv3: 10000)
  config.gram.max_refreshes = 0  # at most this many copies after the first (0: no limit; DINOv3 3)
  config.gram.ckpt = ''  # WORKDIR[:STEP]: the first Gram teacher is that checkpoint's teacher
  # backbone, from step 0 ('' : the EMA teacher at start_step)
  config.gram.teacher_resolution_scale = 1.0  # the Gram teacher's crops are this times
  # aug.global_size (DINOv3: 2), its patch features resized to the student's grid
  config.gram.undistorted = True  # DINOv3's gram_teacher_no_distortions: the global crops' windows
  # and flips without colour distortions; False: the student's global crops themselves (scale 1)
  config.gram.resize_method = 'bicubic'  # the patch features' resize: 'bicubic' or 'bilinear'
  config.gram.resize_antialias = False  # as torch's interpolate(antialias=...) (DINOv3: False)
  config.gram.normalized = True  # L2-normalise the patch features before their Gram matrices
  config.gram.img_level = True  # Gram matrices per crop; False: over the patches of a group of
  config.gram.group_size = 0  # ... this many images (0: each device's images, DINOv3's local batch)
  config.gram.remove_neg = False  # negative similarities of both matrices set to 0
  config.gram.remove_only_teacher_neg = False  # those of the Gram teacher's only

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2e-3  # per 256 images; scaled by batch_size / 256 (optim.lr_scaling)
  config.optim.lr_scaling = 'linear_wrt_256'  # or DINOv2's 'sqrt_wrt_1024' (lr per 1024 images)
  config.optim.layerwise_decay = 1.0  # DINOv2's layer-wise lr decay (0.9); 1: none
  config.optim.patch_embed_lr_mult = 1.0  # DINOv2's lr multiplier of the patch embedding (0.2)
  config.optim.min_lr = 1e-6
  config.optim.warmup_epochs = 5
  config.optim.weight_decay = 0.04
  config.optim.weight_decay_end = 0.4
  config.optim.clip_grad = 3.0
  config.optim.clip_mode = 'per_param'  # 'per_param' (DINO), 'per_module' (DINOv2) or 'global'
  config.optim.freeze_prototypes_epochs = 1
  config.optim.teacher_momentum = 0.99
  config.optim.teacher_momentum_end = 1.0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.fsdp = 1  # devices per FSDP group; the rest is data parallel
  config.mesh.fsdp_min_size = 2**16  # parameters smaller than this stay replicated

  config.eval = ml_collections.ConfigDict()
  config.eval.knn_k = (20,)  # one k or several, e.g. (10, 20, 100, 200): knn_top1_k{K} each
  config.eval.knn_temperature = 0.07
  config.eval.batch_size = 256
  config.eval.probe_epochs = 100  # the quick feature probe (evals type feature_probe)
  config.eval.baselines = False  # also probe raw pixels and the backbone at initialisation
  config.eval.prior_pass_diagnostics = False  # prior passes measure any normalisation
  # Features of --mode=linear_eval and --mode=features (DINO's linear evaluation): the CLS token
  # of each of the last n blocks through the final norm, concatenated; with avgpool (n = 1) also
  # the mean of the last block's patch tokens, interleaved with the CLS token as DINO does.
  config.eval.n_last_blocks = 1
  config.eval.avgpool_patchtokens = False
  # --mode=linear_eval (DINO's protocol): SGD momentum 0.9, no weight decay, lr x batch / 256
  # with a per-epoch cosine to 0; one head per lr of linear_lrs (linear_lr when empty), trained
  # together from one backbone pass; the best head on the eval split is reported.
  config.eval.linear_lr = 1e-3
  config.eval.linear_lrs = ()
  config.eval.linear_epochs = 100
  config.eval.linear_batch_size = 1024  # global (DINO: 128 per GPU on 8 GPUs)
  config.eval.linear_crop_scale = (0.08, 1.0)  # RandomResizedCrop of the training views
  # The heads are scored on the eval split after epochs 1, 1 + k, 1 + 2k, ... and the last (DINO's
  # --val_freq k, default 1); linear_eval.json reports the best top-1 over them (DINO's figure)
  # beside the last epoch's.
  config.eval.linear_eval_every_epochs = 1

  # Named evaluators (kldino/evaluate/evaluators.py): type, every_epochs during training (0: not
  # during training), final (at the end of training and in --mode=eval).
  config.evals = ml_collections.ConfigDict({
      'knn': {
          'type': 'knn',
          'every_epochs': 0,
          'final': True
      },
      'clusters': {
          'type': 'clusters',
          'every_epochs': 0,
          'final': True
      },
      'linear_probe': {
          'type': 'feature_probe',
          'every_epochs': 0,
          'final': True
      },
  })
  config.prior_pass_batch_size = 256

  # The hardware --mode=plan plans for (kldino/modes/plan.py); devices 0: this machine.
  config.hardware = ml_collections.ConfigDict()
  config.hardware.name = ''  # the accelerator type, e.g. 'v5p-128' (TPU: picks the VM image)
  config.hardware.kind = ''  # 'tpu' | 'gpu'
  config.hardware.devices = 0
  config.hardware.hosts = 1
  config.hardware.memory_gib = 0.0  # per device
  config.hardware.peak_tflops = 0.0  # bf16 per device
  config.hardware.mfu = 0.35  # assumed for the plan's time

  # The collapse guard (kldino/core/guard.py): 'warn' logs one line and records the collapse in
  # eval.json; 'stop' also saves a checkpoint and exits with code 6 (docs/failures.md). A kind
  # counts when it holds at every logged step for patience_epochs epochs.
  config.guard = ml_collections.ConfigDict()
  config.guard.collapse = 'warn'  # 'off', 'warn' or 'stop'
  config.guard.patience_epochs = 3
  config.guard.min_clusters = 1.5  # one cluster: the teacher's batch marginal has fewer
  config.guard.uniform_entropy = 0.95  # uniform: per-image entropy above this fraction of log K
  config.guard.uniform_mi = 0.05  # ... and image-cluster mutual information below (nats)
  # constant: the same posterior for every image (MI below this, nats), neither of the above;
  # healthy runs of the digits study keep MI above 0.46 after their first epoch (docs/results.md)
  config.guard.constant_mi = 0.05
  return config
