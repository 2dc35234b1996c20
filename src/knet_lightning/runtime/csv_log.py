"""A CSV metrics log that a resumed run continues (``logger=csv``, the default).

Lightning's ``CSVLogger`` starts ``version_1`` when a run is resumed in its own folder, and a
writer on an existing version deletes its ``metrics.csv``. A run folder here has one training
history, so :class:`ContinuedCSVLogger` keeps ``csv/version_0/metrics.csv``: the rows of the
interrupted run stay, except those at or after the first step the resumed run logs (that run
trains those steps again, so its rows replace theirs), and the header grows with new keys.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        self._earlier: list[dict[str, Any]] | None = None
        path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        keys: list[str] = []
        if os.path.isfile(path):
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self._earlier = list(reader)
                keys = list(reader.fieldnames or [])
        super().__init__(log_dir)
        self.metrics_keys = keys

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; this log continues it instead
        pass

    def save(self) -> None:
        if self._earlier is not None and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [row for row in self._earlier if not row.get("step") or int(float(row["step"])) < first]
            self._record_new_keys()
            with open(self.metrics_file_path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._earlier = None
        super().save()


class ContinuedCSVLogger(CSVLogger):
    """``CSVLogger`` whose version is fixed (0 by default) and whose ``metrics.csv`` a resumed
    run continues (see the module docstring)."""

    def __init__(
        self, save_dir: str, name: str = "csv", version: int | str = 0, prefix: str = "", **kwargs: Any
    ) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment
