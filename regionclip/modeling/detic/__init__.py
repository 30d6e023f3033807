"""Detic (facebookresearch/Detic) open-vocabulary COCO models on the core: CustomRCNN and
the image-label / caption supervision it shares with RegionCLIP's detectors."""
