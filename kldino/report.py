"""`python -m kldino.report`: the study report (kldino/tools/report.py)."""
import sys

from kldino.tools import report

if __name__ == '__main__':
  sys.exit(report.main())
