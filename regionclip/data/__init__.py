"""Datasets (COCO, COCO OVD splits, LVIS, image folders), decoding, transforms and mapping."""
from regionclip.data.catalog import (
    Metadata,
    get_dataset_dicts,
    get_metadata,
    list_datasets,
    register_coco_json,
)
from regionclip.data.image_io import ImageReadError, read_image
from regionclip.data.mapper import InferenceMapper, build_inference_mapper

__all__ = [
    "ImageReadError",
    "InferenceMapper",
    "Metadata",
    "build_inference_mapper",
    "get_dataset_dicts",
    "get_metadata",
    "list_datasets",
    "read_image",
    "register_coco_json",
]
