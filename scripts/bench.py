#!/usr/bin/env python
"""Speed and memory benchmarks of knet-lightning: the command the README and ``make bench`` run.

The sections live in the ``knet_bench`` package next to this file (its docstring says what
each one measures). ::

    python scripts/bench.py --quick --threads 2
    python scripts/bench.py --device cuda --out bench_results/h100.json
"""

import sys
from pathlib import Path

_SCRIPTS = str(Path(__file__).resolve().parent)
if _SCRIPTS not in sys.path:  # loaded by path rather than run (tests/test_bench.py)
    sys.path.insert(0, _SCRIPTS)

from knet_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
