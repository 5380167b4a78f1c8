"""Eight simulated CPU devices for every test (set before JAX is imported anywhere)."""
import os
import sys

# Optimisation level 0 halves XLA's compile time, which dominates these tiny models' tests.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
