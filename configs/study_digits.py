"""The normalisation study on the embedded digits: the digits recipe, shortened so that
all of sweeps/study.py (16 runs) finishes within 45 minutes on 2 CPU cores, with a diagnostic
prior pass every epoch in every run (effective clusters, empty clusters, Jensen gap, ||w_bar||).

    python -m launch.sweep --sweep=sweeps/study.py --config=configs/study_digits.py \
        --workdir_root=studies/digits --report
"""
from kldino.config.defaults import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.num_epochs = 3
  config.optim.warmup_epochs = 1
  config.eval.prior_pass_diagnostics = True
  config.checkpoint_every_steps = 1000
  return config
