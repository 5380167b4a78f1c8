"""The collapse guard: tells a collapsed run from the teacher's per-step statistics.

Three kinds, read from the teacher's posteriors p(k | x) over a batch (the train step's
diagnostics, kldino/core/objective.py): one cluster (the batch marginal has exp(H) -> 1 effective
clusters), uniform (each posterior flat: teacher_entropy -> log K and teacher_mi -> 0) and
constant (one posterior shared by every image over some prototypes: teacher_mi -> 0 with neither
of the others; the inverse prior keeps such a teacher where it is, docs/results.md). A kind counts
once its condition has held at every logged step for `guard.patience_epochs` epochs. Thresholds:
kldino/config/defaults.py (guard) and docs/failures.md. Host-side and pure: the loop
(kldino/train.py) feeds it and acts on what it returns.
"""
from __future__ import annotations

import dataclasses
import math

MODES = ('off', 'warn', 'stop')
_FIXES = {
    'one_cluster': 'use an anti-collapse normalisation (--config.objective.normalization=prior '
                   'or center) or lower optim.lr',
    'uniform': 'sharpen the targets (lower objective.teacher_temp / teacher_temp_end), give '
               'the head batch statistics (a head without them can settle on flat posteriors), '
               'or with sinkhorn use fewer prototypes (model.num_prototypes: its equipartition '
               'flattens the targets when the teacher leaves most of them empty, docs/results.md)',
    'constant': 'give the head batch statistics (model.head_norm=batch: a head without them '
                'starts with nearly the same posterior for every image, docs/results.md) or '
                'sharpen the targets (lower objective.teacher_temp)',
}


@dataclasses.dataclass(frozen=True)
class Collapse:
  """A detected collapse: its kind, the step it was detected at, the first step of the run of
  collapsed steps, and the numbers at detection."""
  kind: str
  step: int
  since_step: int
  teacher_clusters: float
  teacher_entropy: float
  teacher_mi: float
  num_prototypes: int
  targets: str = 'image'  # or 'patch': iBOT's patch targets (their teacher's statistics)

  def record(self) -> dict:
    """eval.json's "collapse" (and the sweep runner's summary.json)."""
    return dataclasses.asdict(self)

  def message(self) -> str:
    evidence = (f'the teacher has {self.teacher_clusters:.2f} effective clusters of '
                f'{self.num_prototypes} per batch, per-image entropy {self.teacher_entropy:.3f} '
                f'(log K = {math.log(self.num_prototypes):.3f}) and cluster MI '
                f'{self.teacher_mi:.3f} nats')
    targets = 'patch-target ' if self.targets == 'patch' else ''
    return (f'{targets}{self.kind.replace("_", "-")} collapse at step {self.step}, every logged '
            f'step since step {self.since_step}: {evidence}; {_FIXES[self.kind]}')


def _teacher_clusters(metrics: dict) -> float:
  """exp of the entropy of the batch's mean teacher posterior: H(mean p) = MI + mean H(p)."""
  return math.exp(metrics['teacher_entropy'] + metrics['teacher_mi'])


class CollapseGuard:
  """Feed it each logged step's averaged metrics (`observe`); it returns a Collapse the first
  time one is established, None otherwise, and remembers the first (`collapse`)."""

  def __init__(self,
               guard_config,
               num_prototypes: int,
               steps_per_epoch: int,
               patches: bool = False):
    """With `patches` (iBOT) the patch targets' teacher (the patch_* metrics) is watched too."""
    self.mode = guard_config.collapse
    self.num_prototypes = num_prototypes
    self.patience_steps = guard_config.patience_epochs * steps_per_epoch
    self.min_clusters = guard_config.min_clusters
    self.uniform_entropy = guard_config.uniform_entropy * math.log(num_prototypes)
    self.uniform_mi = guard_config.uniform_mi
    self.constant_mi = guard_config.constant_mi
    self.watched = ('image', 'patch') if patches else ('image',)
    self.since = {
        (targets, kind): None for targets in self.watched
        for kind in ('one_cluster', 'uniform', 'constant')
    }
    self.collapse: Collapse | None = None

  def _holds(self, metrics: dict) -> dict[str, bool]:
    """Which kind holds at this step; at most one does."""
    one_cluster = _teacher_clusters(metrics) < self.min_clusters
    flat = metrics['teacher_entropy'] > self.uniform_entropy
    return {
        'one_cluster': one_cluster,
        'uniform': flat and metrics['teacher_mi'] < self.uniform_mi,
        'constant': metrics['teacher_mi'] < self.constant_mi and not (one_cluster or flat),
    }

  def observe(self, step: int, metrics: dict) -> Collapse | None:
    if self.mode == 'off' or self.collapse is not None:
      return None
    for targets in self.watched:
      prefix = 'patch_' if targets == 'patch' else ''
      teacher = {name: metrics[prefix + name] for name in ('teacher_entropy', 'teacher_mi')}
      for kind, holds in self._holds(teacher).items():
        key = (targets, kind)
        if not holds:
          self.since[key] = None
          continue
        if self.since[key] is None:
          self.since[key] = step
        if step - self.since[key] >= self.patience_steps:
          self.collapse = Collapse(kind=kind,
                                   step=step,
                                   since_step=self.since[key],
                                   teacher_clusters=_teacher_clusters(teacher),
                                   teacher_entropy=float(teacher['teacher_entropy']),
                                   teacher_mi=float(teacher['teacher_mi']),
                                   num_prototypes=self.num_prototypes,
                                   targets=targets)
          return self.collapse
    return None
