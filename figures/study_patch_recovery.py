"""Figure: layer × head heatmap of mean denoising-patching recovery (study run).

Reads the tables only, never a model:
    .venv/bin/python figures/study_patch_recovery.py runs/study-smollm2-135m-<hash> [--no-png]
"""

import sys

from mechinterp.experiments.study.report import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("patch_recovery"))
