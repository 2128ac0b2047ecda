"""wsss_core: weakly supervised semantic segmentation from image-level labels.

Stages: classifier -> CAMs -> dense CRF -> IRNet random walk -> pseudo masks ->
segmenter, each a function `stage(cfg, run)` shared by notebooks and the CLI.
Importing the package registers every stage and the config section it
declares (`stages.registry`), so a parameter file knows every section.
"""

__version__ = "0.1.0"


def _check_working_folder() -> None:
    """A deleted working folder would otherwise end in oneMKL's "Cannot load libtorch_cpu.so"."""
    import os
    import sys

    try:
        os.getcwd()
    except FileNotFoundError:
        msg = "the current folder no longer exists (deleted or moved); cd to an existing folder and rerun"
        if os.path.basename(sys.argv[0]) in ("wsss", "-m", "cli.py"):  # the command line: one line, exit 2
            print(f"wsss: error: {msg}", file=sys.stderr)
            raise SystemExit(2) from None
        raise FileNotFoundError(msg) from None


_check_working_folder()

from . import stages  # noqa: E402,F401  (the registry composes the config: every stage, every section)
