"""RegionCLIP: region-based language-image pretraining and open-vocabulary detection."""

__version__ = "0.1.0"
