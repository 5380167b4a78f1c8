"""Any mesh restores any checkpoint: an FSDP-sharded state saved on 8 devices restores replicated.
(The runs that are killed, preempted or stopped by a full disk: tests/e2e/test_checkpoint.py.)"""
import jax

from configs.smoke import get_config as smoke_config
from kldino.train import Trainer
from tests.helpers import assert_states_equal


def test_fsdp_sharded_state_restores_replicated_and_back(tmp_path):
  sharded_config = smoke_config()
  sharded_config.mesh.fsdp = 8
  trainer = Trainer(sharded_config, str(tmp_path))
  state = trainer.program.init(0)
  assert any(
      len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
      for leaf in jax.tree.leaves(state.student))
  trainer.save(state, 3, force=True)
  trainer.checkpointer.wait()
  replicated = Trainer(smoke_config(), str(tmp_path)).restore_or_init()
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(replicated.student))
  assert_states_equal(jax.device_get(replicated), jax.device_get(state))
