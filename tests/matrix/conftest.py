"""`MECHINTERP_MATRIX_JSON=path pytest tests/matrix` writes each cell's largest difference."""

import os


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("MECHINTERP_MATRIX_JSON")
    if path:
        from matrix_support import write_results

        write_results(path)
