"""Checkpoints: what knet-lightning stores in one and how it is read back.

* :mod:`~.keys`: the entries added to Lightning's checkpoint (model config, inference settings,
  data config, conversion record), plain values only;
* :mod:`~.io`: atomic, checksummed writes and ``weights_only`` reads (``SafeCheckpointIO``);
* :mod:`~.convert`: published MMDetection / MMSegmentation checkpoints mapped onto our networks
  (``mode=convert``);
* :mod:`~.model`: the model config a checkpoint was trained with, and what a command line may
  change of it (``mode=eval``, ``mode=predict``, ``load_from=``, the Segmenter);
* :mod:`~.rebuild`: :func:`~.rebuild.rebuild_module`, the one function that builds the module of
  a checkpoint, for ``mode=eval``, ``mode=predict``, the Segmenter and ``mode=export``. It needs
  the LightningModule class but may not import ``knet_lightning.module`` (a layer above): it
  instantiates the ``_target_`` of the stored model config through Hydra instead, so the
  rebuild lives here, below its callers in ``inference`` and ``cli``.

Inside, the imports run keys/io -> convert -> model -> rebuild, never back. Layer: above ``models`` (the
conversion maps onto their parameters) and ``data``, beside ``tasks``; it may import those and
``runtime`` and the root's shared modules, never ``inference``, ``training``, ``module`` or
``cli``. A checkpoint names modules of this package only as the ``_target_`` strings of its
stored model and data configs (``knet_lightning.module``, ``models``, ``criterion``, ``data``).
"""
