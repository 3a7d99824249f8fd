"""Figure: who steers where the retrieval heads look: the top upstream heads per address
corruption and receiver input (queries, keys), edges into the retrieval heads weighted by mean
path-patching recovery of their attention (study run with `addressing:`).

Reads the tables only, never a model:
    .venv/bin/python figures/study_address_circuit.py runs/study-smollm2-135m-<hash> [--no-png]
"""

import sys

from mechinterp.experiments.study.report import figure_main

if __name__ == "__main__":
    sys.exit(figure_main("address_circuit"))
