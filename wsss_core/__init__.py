"""wsss_core: weakly supervised semantic segmentation from image-level labels.

Stages: classifier -> CAMs -> dense CRF -> IRNet random walk -> pseudo masks ->
segmenter, each a function `stage(cfg, run)` shared by notebooks and the CLI.
"""

__version__ = "0.1.0"
