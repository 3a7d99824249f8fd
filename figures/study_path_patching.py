"""Figure: sender layer × head heatmaps of mean path-patching recovery into the retrieval heads'
queries and keys (study run).

Reads the tables only, never a model:
    .venv/bin/python figures/study_path_patching.py runs/study-smollm2-135m-<hash> [--no-png]
"""

import sys

from mechinterp.experiments.study.report import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("path_patching"))
