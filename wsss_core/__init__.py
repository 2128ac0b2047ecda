"""wsss_core: weakly supervised semantic segmentation from image-level labels.

Stages: classifier -> CAMs -> dense CRF -> IRNet random walk -> pseudo masks ->
segmenter, each a function `stage(cfg, run)` shared by notebooks and the CLI.
Importing the package registers every stage and the config section it
declares (`stages.registry`), so a parameter file knows every section.
"""

__version__ = "0.1.0"

from . import stages  # noqa: E402,F401  (the registry composes the config: every stage, every section)
