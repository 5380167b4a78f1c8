"""`--mode=eval`: the config's final evaluators (config.evals) on the teacher of the latest (or
--step) checkpoint, on any dataset kldino reads; writes the evaluation JSON."""
from __future__ import annotations

import os

from kldino.evaluate.evaluators import Evaluators, evaluate, write_eval_json
from kldino.run import Run


def run(config, workdir: str, *, step: int | None, output: str | None) -> dict:
  opened = Run(config, workdir)
  evaluators = Evaluators(opened)  # checks the evals entries before anything is read
  teacher, step = opened.restore_teacher(step)
  results = evaluate(evaluators, teacher, step, opened.teacher_temp(step))
  write_eval_json(results, output or os.path.join(workdir, 'eval.json'))
  return results
