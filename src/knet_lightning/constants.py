"""Constants shared by data/, criterion/, evaluation/ and the module; a module of its own so
that criterion/ and models/ need not import data/."""

# the label the readers write for void and crowd pixels in sem_seg, as in MMSeg and detectron2
IGNORE_INDEX = 255
