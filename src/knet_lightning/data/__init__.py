"""Data: the data sets' readers, each with its Lightning data module beside it, and what they share.

Owns: the readers and data modules of COCO panoptic (``coco.py``, with :class:`COCOImages`, the
base of the COCO-format readers), COCO instance (``coco_instance.py``), Cityscapes
(``cityscapes/``), ADE20K (``ade20k.py``), a folder of your own semantic labels
(``semantic_folder.py``) and the generated shapes (``synthetic.py``, drawn by
``synthetic_render.py``); the base data module with the loaders and the set-up every data set
shares (``datamodule.py``); transforms (``transforms.py``, MMSegmentation's semantic pipeline in
``mmseg_pipeline.py``, the references' resize arithmetic in ``resize.py``); the resumable
training order (``sampling.py``); image and JSON reading (``io.py``); class metadata and the data
errors (``meta.py``); and ``mode=check_data``'s report (``check.py``).

Imports: layer 3 of the package (see :mod:`knet_lightning`), so only layers 1 and 2: errors /
constants / settings and runtime. Today that is :mod:`knet_lightning.constants`
(``IGNORE_INDEX``) and :mod:`knet_lightning.runtime.distributed` (``eval_sampler``, in
``datamodule.py``); nothing from models or the layers above them, which import from here.
"""
