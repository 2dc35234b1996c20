"""Running a trained K-Net outside a fit: the Python API and ``mode=predict`` / ``mode=export``.

* :mod:`~.segmenter`: :class:`~knet_lightning.Segmenter`, a checkpoint (or an ``.onnx`` file)
  with its preprocessing and post-processing, called on images;
* :mod:`~.predict`: ``mode=predict``'s inputs and output files;
* :mod:`~.test_time`: how the network is run on an image (whole, sliding windows, multi-scale
  + flip), for the Segmenter and for the LightningModule's validation and test alike;
* :mod:`~.onnx_export`: a checkpoint's network as one ONNX file (``mode=export``);
* :mod:`~.onnx_runtime`: that file's metadata and its ONNX Runtime session.

Inside, the imports run test_time, onnx_runtime -> onnx_export -> segmenter, never back (the
Segmenter imports the export lazily, for a checkpoint run on ONNX Runtime). Layer: above
``tasks`` and ``checkpoint`` (the network is rebuilt with :mod:`knet_lightning.checkpoint.model`),
beside ``training``; it may import everything below (``postprocess`` for the results, ``data``
for reading and transforms, ``models``, ``runtime``, the root's shared modules). ``module``
(test-time strategies), ``configs``, ``cli`` and the package root import it.
"""
