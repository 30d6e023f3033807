"""Detection data structures with detectron2 semantics."""
from regionclip.structures.boxes import Boxes, BoxMode, pairwise_iou
from regionclip.structures.image_list import ImageList
from regionclip.structures.instances import Instances

__all__ = ["BoxMode", "Boxes", "ImageList", "Instances", "pairwise_iou"]
