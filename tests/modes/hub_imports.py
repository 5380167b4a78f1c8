"""What the import tests of published backbones share: random-filled official models, one
import of a state dict with its named config, the error measure, the export back to PyTorch."""
import numpy as np
import torch
from flax import nnx

from configs import pretrained
from kldino.modes import export as export_mode
from kldino.modes import import_dino as import_mode
from kldino.run import Run


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter of `model` random (LayerScale's 0.1, the rest 0.05; buffers untouched)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.copy_(torch.randn_like(param) * (0.1 if name.endswith('gamma') else 0.05))
  return model


def import_reference(reference, name: str, filename: str, tmp_path_factory):
  """(reference, kldino's teacher backbone, .pth path, workdir) of `reference`'s state dict
  imported with configs/pretrained.py:`name`."""
  path = str(tmp_path_factory.mktemp('pth') / filename)
  torch.save(reference.state_dict(), path)
  workdir = str(tmp_path_factory.mktemp('run'))
  import_mode.run(pretrained.get_config(name), workdir, import_from=path)
  opened = Run(pretrained.get_config(name), workdir)
  teacher, _ = opened.restore_teacher(None)
  return reference, nnx.merge(opened.graphdef, teacher).backbone, path, workdir


def relative_error(got, expected) -> float:
  return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def assert_export_gives_back(name: str, path: str, workdir: str, reloaded, output: str):
  """--format=pth of the imported run loads into `reloaded` with strict=True, every tensor the
  one imported."""
  written = export_mode.run(pretrained.get_config(name),
                            workdir,
                            step=None,
                            output=output,
                            format='pth')
  state = torch.load(written['export'], weights_only=True)
  reloaded.load_state_dict(state, strict=True)
  original = torch.load(path, weights_only=True)
  assert sorted(state) == sorted(original)
  for key, value in original.items():
    torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
