#!/usr/bin/env bash
# Create the process work pool if it is missing, then deploy both flows from deployments/prefect.yaml.
# Uses the Prefect API of the current profile / PREFECT_API_URL (e.g. http://127.0.0.1:4200/api).
set -euo pipefail

cd "$(dirname "$0")/.."                     # the repository root: entrypoints are relative to it
POOL=ckptflow-process                       # = work_pool.name in deployments/prefect.yaml
if [[ -x .venv/bin/prefect ]]; then PREFECT=.venv/bin/prefect; else PREFECT=prefect; fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1

if "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
    echo "work pool $POOL exists"
else
    "$PREFECT" work-pool create "$POOL" --type process
fi
"$PREFECT" --no-prompt deploy --all --prefect-file deployments/prefect.yaml
