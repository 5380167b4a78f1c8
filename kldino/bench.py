"""`python -m kldino.bench`: the benchmark (kldino/tools/bench.py)."""
from absl import app

from kldino.tools import bench

if __name__ == '__main__':
  app.run(bench.main)
