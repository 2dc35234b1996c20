"""The CSV metrics log that a resumed run continues (knet_lightning.runtime.csv_log)."""

from __future__ import annotations

import csv
from pathlib import Path

from knet_lightning.runtime.csv_log import ContinuedCSVLogger


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_resumed_run_replaces_the_steps_it_trains_again_and_adds_new_keys(tmp_path: Path) -> None:
    first = ContinuedCSVLogger(str(tmp_path))
    for step in range(6):  # the interrupted run logged up to step 5; its checkpoint was at step 3
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    first.save()
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    assert len(_rows(path)) == 6

    resumed = ContinuedCSVLogger(str(tmp_path))
    assert resumed.log_dir == first.log_dir  # version_0 again, not version_1
    resumed.log_metrics({"train/loss": 0.5, "val/pq": 40.0}, step=3)
    resumed.log_metrics({"train/loss": 0.25}, step=4)
    resumed.save()
    rows = _rows(path)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [float(r["train/loss"]) for r in rows] == [10.0, 9.0, 8.0, 0.5, 0.25]
    assert rows[3]["val/pq"] == "40.0" and rows[0]["val/pq"] == ""
