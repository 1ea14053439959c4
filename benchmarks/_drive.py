"""Train a ckptflow run with the library only (no Prefect, no CLI), as the test helpers do.

    CKPTFLOW_HOME=... CKPTFLOW_...=... python benchmarks/_drive.py RUN_NAME

Settings come from the environment. prepare → open run → every chunk once (no retries) with
the settings' launcher, exactly the steps the `finetune` flow runs, so the difference to
`ckptflow run` is Prefect and the CLI.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def main() -> int:
    from ckptflow.launchers import launcher
    from ckptflow.quiet import quiet_libraries
    from tests.helpers import settings_for, train_without_prefect

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    quiet_libraries()
    settings = settings_for(Path(os.environ["CKPTFLOW_HOME"]))
    train_without_prefect(settings, sys.argv[1], launch=launcher(settings.train.launcher))  # as the flow's tasks
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
