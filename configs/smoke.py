"""A ViT small enough to train, checkpoint, resume and evaluate in seconds on a CPU: for checking
an install and for the end-to-end tests, not for results.

    python -m kldino.main --config=configs/smoke.py --workdir=/tmp/kldino_smoke
"""
from kldino.config.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.num_epochs = 2
  config.batch_size = 32
  config.log_every_steps = 10
  config.checkpoint_every_steps = 10
  config.model.name = 'vit_nano'
  config.model.num_prototypes = 16
  config.model.head_hidden_dim = 32
  config.model.head_bottleneck_dim = 8
  config.aug.num_local = 2
  config.mesh.fsdp_min_size = 1  # shard every parameter when mesh.fsdp > 1
  config.eval.probe_epochs = 10
  config.eval.linear_batch_size = 256
  return config
