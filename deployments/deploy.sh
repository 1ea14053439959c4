#!/usr/bin/env bash
# Create the process work pool if it is missing, then deploy both flows from deployments/prefect.yaml.
# Uses the Prefect API of the current profile / PREFECT_API_URL (e.g. http://127.0.0.1:4200/api), and
# PREFECT_API_AUTH_STRING when the server requires authentication. Exit 2: credentials missing or wrong.
set -euo pipefail

cd "$(dirname "$0")/.."                     # the repository root: entrypoints are relative to it
POOL=ckptflow-process                       # = work_pool.name in deployments/prefect.yaml
if [[ -x .venv/bin/prefect ]]; then PREFECT=.venv/bin/prefect; else PREFECT=prefect; fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1

if inspected=$("$PREFECT" work-pool inspect "$POOL" 2>&1); then
    echo "work pool $POOL exists"
elif grep -q "401 Unauthorized" <<<"$inspected"; then
    # A server started with PREFECT_SERVER_API_AUTH_STRING (README: Team setup) wants it from every client.
    echo "error: the Prefect server at ${PREFECT_API_URL:-of the current profile} refused us (401 Unauthorized):" \
         "set PREFECT_API_AUTH_STRING=user:password to the server's PREFECT_SERVER_API_AUTH_STRING" >&2
    exit 2
else
    "$PREFECT" work-pool create "$POOL" --type process
fi
"$PREFECT" --no-prompt deploy --all --prefect-file deployments/prefect.yaml
