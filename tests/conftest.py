"""Eight simulated CPU devices for every test, kldino's XLA flags (kldino/runtime/xla_env.py, as its
entry points set them), and one compilation cache for all of them (set before JAX is imported
anywhere, and inherited by the processes the tests start)."""
import os
import sys
import tempfile

# Optimisation level 0 halves XLA's compile time, which dominates these tiny models' tests.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The end-to-end tests start many processes that compile the same programs (configs/smoke.py's
# step, prior pass and evaluation): JAX's persistent cache compiles each once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'kldino-tests-jax-cache-{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kldino.runtime import xla_env  # pylint: disable=g-import-not-at-top,wrong-import-position

xla_env.set_xla_flags()
