"""What a fit adds to the LightningModule (:mod:`knet_lightning.module`): the optimizer and the
learning-rate schedule (:mod:`~.optim`), the global batch plan across devices and nodes
(:mod:`~.global_batch`), and the Lightning callbacks of every run: those that write and restore
checkpoints (:mod:`~.checkpointing`) and those that report and export (:mod:`~.callbacks`; the
latter serve ``mode=eval`` too).

Layer: beside ``inference`` (neither imports the other), above ``tasks`` and ``checkpoint``; it
may import everything below it (``postprocess`` for the overlays, ``data`` for the palette,
``runtime``, the root's shared modules). ``module``, ``configs`` and ``cli`` import it.
"""
