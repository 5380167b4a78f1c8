"""The entry points' re-execution with glibc's transparent-huge-page tunable."""
import os
import platform
import subprocess
import sys
import textwrap

from kldino.runtime import host_memory

GLIBC = ('glibc', '2.36')


def test_adds_the_tunable_where_it_helps_and_keeps_other_tunables():
  env = host_memory.huge_page_environ({'PATH': '/bin'}, GLIBC, 'madvise')
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  env = host_memory.huge_page_environ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, GLIBC,
                                      'madvise')
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}


def test_changes_nothing_where_it_would_not_help():
  assert host_memory.huge_page_environ({}, GLIBC, 'always') is None  # THP on every mapping
  assert host_memory.huge_page_environ({}, GLIBC, 'never') is None  # THP off
  assert host_memory.huge_page_environ({}, GLIBC, '') is None  # not Linux
  assert host_memory.huge_page_environ({}, ('glibc', '2.34'), 'madvise') is None  # no tunable
  assert host_memory.huge_page_environ({}, ('', ''), 'madvise') is None  # musl, macOS
  # The user's own setting stands, on or off: no re-execution loop either.
  for setting in ('glibc.malloc.hugetlb=0', 'glibc.malloc.hugetlb=1'):
    assert host_memory.huge_page_environ({'GLIBC_TUNABLES': setting}, GLIBC, 'madvise') is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory.thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert host_memory.thp_mode(str(path)) == 'always'
  assert host_memory.thp_mode(str(tmp_path / 'missing')) == ''


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
