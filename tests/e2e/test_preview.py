"""--mode=preview as a command: it needs an output folder."""
from tests.helpers import run_kldino


def test_preview_needs_an_output_folder(tmp_path):
  result = run_kldino('--mode=preview',
                      '--config=configs/smoke.py',
                      f'--workdir={tmp_path}',
                      timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      'kldino: --mode=preview needs --output=DIR (the folder for the PNGs and index.json)')
