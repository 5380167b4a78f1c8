"""A real process re-executes itself once with glibc's transparent-huge-page tunable
(kldino/runtime/host_memory.py)."""
import os
import platform
import subprocess
import sys
import textwrap

from kldino.runtime import host_memory


def test_a_process_reexecutes_itself_once_with_the_tunable(tmp_path):
  """A real process: it runs twice where this machine qualifies (the second time with the
  tunable set and the same arguments), once elsewhere."""
  script = tmp_path / 'entry.py'
  log = tmp_path / 'runs.txt'
  script.write_text(
      textwrap.dedent(f'''
      import os, sys
      with open({str(log)!r}, 'a') as f:
        f.write(repr((sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))) + '\\n')
      from kldino.runtime import host_memory
      host_memory.reexec_with_huge_pages()
      print('done')
  '''))
  env = {key: value for key, value in os.environ.items() if key != 'GLIBC_TUNABLES'}
  # An interactive session is never replaced: one run.
  subprocess.run([sys.executable, '-i', str(script), '--flag=1'],
                 env=env,
                 stdin=subprocess.DEVNULL,
                 capture_output=True,
                 check=True,
                 timeout=120)
  assert log.read_text().splitlines() == [repr((['--flag=1'], None))]
  log.unlink()
  out = subprocess.run([sys.executable, str(script), '--flag=1'],
                       env=env,
                       capture_output=True,
                       text=True,
                       check=True,
                       timeout=120)
  assert out.stdout == 'done\n'
  runs = log.read_text().splitlines()
  if host_memory.huge_page_environ(env, platform.libc_ver(), host_memory.thp_mode()) is None:
    assert runs == [repr((['--flag=1'], None))]
  else:
    assert runs == [repr((['--flag=1'], None)), repr((['--flag=1'], 'glibc.malloc.hugetlb=1'))]
