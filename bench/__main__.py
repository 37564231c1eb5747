"""``python -m bench``: run every benchmark and write bench/report/REPORT.md (see bench/report.py)."""
import sys

from bench.report import main

sys.exit(main())
