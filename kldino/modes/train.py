"""`--mode=train` (the default): train, resuming from the workdir's latest checkpoint, then
evaluate the teacher backbone (kldino/train.py)."""
from kldino import train


def run(config, workdir: str) -> dict:
  return train.train_and_evaluate(config, workdir)
