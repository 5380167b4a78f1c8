"""DINO ViT-S/16, ViT-B/16 and ViT-L/16, DINOv2 ViT-L/16 and DINOv3 ViT-L/16 on ImageNet-1k, laid
out for real hardware.

    get_config('MODEL,HARDWARE')   MODEL in vit_s16 | vit_b16 | vit_l16 | dinov2_vitl16 |
                                            dinov3_vitl16 | dinov3_vitl16_prior
                                   HARDWARE in v4-32 | v5e-64 | v5p-128 | h100x8 | h100x32

    # TPU pod (run on every worker; launch/tpu_vm.py does this):
    python -m kldino.main --config=configs/imagenet_scale.py:vit_b16,v5p-128 \
        --workdir=gs://BUCKET/kldino/vit_b16 --config.data.data_dir=gs://BUCKET/tensorflow_datasets

The recipes are configs/imagenet_vit_s16.py (DINO's), configs/imagenet_dinov2_vitl16.py
(DINOv2's), both with the prior normalisation, and configs/imagenet_dinov3_vitl16.py (DINOv3's,
with Sinkhorn-Knopp or, `_prior`, the prior); this file sets what the model and the hardware
decide: the global batch (the recipe's on the pods, 64 per GPU on the H100 hosts), the mesh (FSDP
groups where the replicated state would crowd a device's memory), bf16 compute (float32 master
weights), DINO's lr per 256 images (its ViT-B/16: 7.5e-4 at batch 1024) and stochastic depth,
and the TFDS data_dir on a bucket (override it on the command line).
"""
from configs import imagenet_dinov2_vitl16
from configs import imagenet_dinov3_vitl16
from configs import imagenet_vit_s16
from configs.common import parse_arg

# Devices, processes (hosts), the accelerator's memory per device (GiB) and its peak dense bf16
# TFLOP/s per device (the vendors' data sheets: TPU v4 275, v5e 197, v5p 459; H100 SXM 989).
HARDWARE = {
    'v4-32': dict(kind='tpu', devices=16, hosts=4, memory=32, tflops=275),
    'v5e-64': dict(kind='tpu', devices=64, hosts=16, memory=16, tflops=197),
    'v5p-128': dict(kind='tpu', devices=64, hosts=16, memory=95, tflops=459),
    'h100x8': dict(kind='gpu', devices=8, hosts=1, memory=80, tflops=989),
    'h100x32': dict(kind='gpu', devices=32, hosts=4, memory=80, tflops=989),
}

_VIT_L_FSDP = {16: 16, 32: 16, 80: 8, 95: 8}  # FSDP group size by device memory (GiB)
MODELS = {
    # name, drop path, lr per 256 images, block rematerialisation, FSDP group size by the
    # memory of one device, and DINO's linear-evaluation features (last blocks, avgpool)
    'vit_s16':
        dict(name='vit_small',
             drop_path=0.1,
             lr=5e-4,
             remat=False,
             fsdp={
                 16: 1,
                 32: 1,
                 80: 1,
                 95: 1
             },
             n_last_blocks=4,
             avgpool=False),
    'vit_b16':
        dict(name='vit_base',
             drop_path=0.1,
             lr=1.875e-4,
             remat=False,
             fsdp={
                 16: 8,
                 32: 4,
                 80: 1,
                 95: 1
             },
             n_last_blocks=1,
             avgpool=True),
    'vit_l16':
        dict(name='vit_large',
             drop_path=0.4,
             lr=1.25e-4,
             remat=True,
             fsdp=_VIT_L_FSDP,
             n_last_blocks=1,
             avgpool=True),
    # DINOv2's and DINOv3's recipes as they are (drop path, lr, evaluation): only the mesh by
    # device memory.
    'dinov2_vitl16':
        dict(recipe=imagenet_dinov2_vitl16, fsdp=_VIT_L_FSDP),
    'dinov3_vitl16':
        dict(recipe=imagenet_dinov3_vitl16, fsdp=_VIT_L_FSDP),
    'dinov3_vitl16_prior':
        dict(recipe=imagenet_dinov3_vitl16, recipe_arg='prior', fsdp=_VIT_L_FSDP),
}

DATA_DIR = 'gs://YOUR_BUCKET/tensorflow_datasets'


def _parse(arg):
  args = parse_arg(arg, model='', hardware='')
  if args.model not in MODELS or args.hardware not in HARDWARE:
    raise ValueError(f"configs/imagenet_scale.py needs ':MODEL,HARDWARE' with MODEL in "
                     f"{', '.join(MODELS)} and HARDWARE in {', '.join(HARDWARE)}; got {arg!r}")
  return args.hardware, MODELS[args.model], HARDWARE[args.hardware]


def get_config(arg=None):
  hardware_name, model, hardware = _parse(arg)
  if 'recipe' in model:
    config = model['recipe'].get_config(model.get('recipe_arg'))
  else:
    config = imagenet_vit_s16.get_config()
    config.model.update(name=model['name'], drop_path=model['drop_path'], remat=model['remat'])
    config.optim.lr = model['lr']
    config.batch_size = 1024
    config.eval.n_last_blocks = model['n_last_blocks']
    config.eval.avgpool_patchtokens = model['avgpool']
  config.model.compute_dtype = 'bfloat16'
  if hardware['kind'] == 'gpu':
    config.batch_size = 64 * hardware['devices']
  config.mesh.fsdp = model['fsdp'][hardware['memory']]
  config.data.data_dir = DATA_DIR
  config.eval.batch_size = config.prior_pass_batch_size = 16 * hardware['devices']
  config.hardware.update(name=hardware_name,
                         kind=hardware['kind'],
                         devices=hardware['devices'],
                         hosts=hardware['hosts'],
                         memory_gib=float(hardware['memory']),
                         peak_tflops=float(hardware['tflops']))
  return config
