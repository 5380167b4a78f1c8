"""The normalisation study on the recipe that learns: configs/digits.py (the ViT default, 80
epochs) with a diagnostic prior pass every epoch in every run (effective clusters, empty
clusters, Jensen gap, ||w_bar||) and the k-NN probe every 10 epochs.

    python -m launch.sweep --sweep=sweeps/study_vit.py --config=configs/study_digits_vit.py \
        --workdir_root=studies/digits_vit --report
"""
from configs import digits


def get_config(arg=None):
  config = digits.get_config(arg)
  config.eval.prior_pass_diagnostics = True
  config.eval.baselines = False  # the same for every run: configs/digits.py's results have them
  config.evals.knn.every_epochs = 10
  return config
