"""Figure: answer retrieved vs heads knocked out, top-k vs random-k, with CI bands (study run).

Reads the tables only, never a model:
    .venv/bin/python figures/study_knockout_vs_k.py runs/study-smollm2-135m-<hash> [--no-png]
"""

import sys

from mechinterp.experiments.study.report import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("knockout_vs_k"))
