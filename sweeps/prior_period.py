"""The prior period T against the seed: how often must the full-dataset prior be re-estimated?

    python -m launch.sweep --sweep=sweeps/prior_period.py --config=configs/digits.py \
        --workdir_root=/tmp/kldino_period
"""


def get_sweep():
  return {
      'grid': {
          'objective.prior_every_epochs': [1, 2, 5],
          'seed': [0, 1]
      },
      'fixed': {
          'objective.normalization': 'prior',
          'objective.prior_source': 'sweep'
      },
  }
