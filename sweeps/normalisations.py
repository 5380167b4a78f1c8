"""Every teacher normalisation of docs/method.md, one job each.

    python -m launch.sweep --sweep=sweeps/normalisations.py --config=configs/digits.py \
        --workdir_root=/tmp/kldino_normalisations
"""


def get_sweep():
  return {
      'list': [
          {
              'objective.normalization': 'prior',
              'objective.prior_source': 'sweep'
          },
          {
              'objective.normalization': 'prior',
              'objective.prior_source': 'batch'
          },
          {
              'objective.normalization': 'prior',
              'objective.prior_source': 'ema'
          },
          {
              'objective.normalization': 'center'
          },
          {
              'objective.normalization': 'sinkhorn'
          },
          {
              'objective.normalization': 'teacher_bn'
          },
          {
              'objective.normalization': 'none'
          },
      ],
  }
