"""Detection models: CLIP trunk and text tower, offline RPN, region head, predictor, detectors."""
