"""`python tests/service/gated_serve.py [flags]`: albert-serve whose device a test holds, through a file.

Every forward pass first prints "gate: entered (N sequences)" and then waits while the file
$ALBERT_TEST_GATE/closed exists; the test creates it to hold the device and deletes it to let go. Nothing
else changes: the same settings, server, signals and shutdown as `albert-serve`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from service import engine
from service.__main__ import main

CLOSED = Path(os.environ["ALBERT_TEST_GATE"]) / "closed"
_run = engine.ModelRunner.run


def gated_run(self, sequences, plan=None):
    print(f"gate: entered ({len(sequences)} sequences)", file=sys.stderr, flush=True)
    while CLOSED.exists():
        time.sleep(0.01)
    return _run(self, sequences, plan)


engine.ModelRunner.run = gated_run

if __name__ == "__main__":
    main(sys.argv[1:])
