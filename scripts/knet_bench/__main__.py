"""``python -m knet_bench`` (from scripts/) or ``python scripts/knet_bench``: the benchmarks' CLI."""

import sys
from pathlib import Path

if not __package__:
    # run as a folder, the package's parent is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knet_bench.cli import main  # noqa: E402

sys.exit(main())
