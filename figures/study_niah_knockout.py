"""Figure: held-out NIAH length × depth answer rate, with and without knockout (study run).

Reads the tables only, never a model:
    .venv/bin/python figures/study_niah_knockout.py runs/study-smollm2-135m-<hash> [--no-png]
"""

import sys

from mechinterp.experiments.study.report import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("niah_knockout"))
