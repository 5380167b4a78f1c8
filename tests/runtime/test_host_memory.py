"""The entry points' re-execution with glibc's transparent-huge-page tunable: where it helps, and
the THP mode read. (A real process re-executing itself: tests/e2e/test_host_memory.py.)"""
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
