"""What a run needs from where it runs, whatever it trains: processes and devices
(:mod:`~.distributed`, :mod:`~.memory_format`), the cluster (:mod:`~.slurm`, :mod:`~.signals`),
sweeps (:mod:`~.sweep`), the ``strict_reproduction`` preset (:mod:`~.reproduction`), secrets kept
out of every file a run writes (:mod:`~.secrets`) and the experiment loggers (:mod:`~.csv_log`,
:mod:`~.loggers`).

Layer: above the package root's shared modules (``errors``, ``constants``, ``settings``), which
are all it may import; ``data`` and everything above it may import it. Nothing here knows about
data sets, networks or tasks (the order is in :mod:`knet_lightning`'s docstring and
``tests/test_architecture.py``).
"""
