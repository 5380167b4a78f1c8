"""kldino: self-supervised pretraining by clustering, with the teacher's targets normalised by the
inverse cluster prior of the whole training set (see README.md).

Importing kldino changes nothing global: the entry points (kldino.main, kldino.bench) set XLA's
flags (kldino/runtime/xla_env.py) and the huge-page re-execution (kldino/runtime/host_memory.py)
themselves.
"""
