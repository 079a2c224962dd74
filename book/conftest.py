"""pytest settings for running the book's notebooks with nbval.

nbval waits only 5 s for each output message after a cell has finished; on a busy 2-core
machine a kernel can take longer to flush a figure, which fails the cell spuriously. The
cell's own timeout (``--nbval-cell-timeout``) is unchanged.
"""

NBVAL_OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items):
    for item in items:
        if type(item).__name__ == "IPyNbCell":
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S
