"""From the network's outputs to what a user gets, one image at a time.

* :mod:`~.merge`: the official test path of each task: the panoptic merge of thing and stuff
  kernels, the instance top-k, the semantic argmax (and a panoptic map's semantic one);
* :mod:`~.sparse_merge`: the panoptic merge's decisions without its full-resolution maps;
* :mod:`~.rescale`: maps at network scale back to the original image (``rescale_masks``);
* :mod:`~.results`: the typed results (:class:`~.results.SegmentationResult`,
  :class:`~.results.Segment`, :class:`~.results.SkippedInput`);
* :mod:`~.visualize`: overlays of segmentations on images.

Layer: beside ``criterion`` and ``evaluation``, below ``tasks`` (a task object calls the merge,
builds the results' segments and draws the overlays) and everything above it. It imports only
torch, numpy and PIL: no other part of this package.
"""
