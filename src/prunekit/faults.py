"""Named pause points for fault-injection tests: a kill must land at a known moment, not after a sleep.

With `PRUNEKIT_PAUSE_AT=<point>` and `PRUNEKIT_PAUSE_FILE=<path>` in the environment, the process that reaches
`pause_point(<point>)` writes `<path>` and waits there until it is killed; everywhere else (the default) the
call returns at once. Points: `scoring` (after the first layer of a calibration pass) and `saving` (a
checkpoint's files written, not yet renamed into place).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_point(name: str) -> None:
    if os.environ.get("PRUNEKIT_PAUSE_AT") != name:
        return
    marker = os.environ.get("PRUNEKIT_PAUSE_FILE")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    while True:  # until the test's signal arrives
        time.sleep(0.05)
