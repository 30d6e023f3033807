"""Datasets (COCO, COCO OVD splits, LVIS, image folders), decoding, transforms and mapping."""
from regionclip.data.catalog import (
    Metadata,
    get_dataset_dicts,
    get_metadata,
    list_datasets,
    register_coco_json,
)
from regionclip.data.mapper import (
    ImageReadError,
    InferenceMapper,
    build_inference_mapper,
    read_image,
)

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
