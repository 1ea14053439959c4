"""`ckptflow serve`: serve the finetune and retrain deployments from this process (flow.serve), no work pool.

Names, descriptions, tags, parameters, schedules and concurrency come from
deployments/prefect.yaml, so served and worker-based deployments behave the same.
Stop with Ctrl-C or SIGTERM: Prefect pauses the served deployments' schedules on shutdown.
Serve or `make deploy` + a worker, not both: deployments of the same name that run on a work
pool are refused here (delete them first), because served runs of them would crash.
Against a server with authentication, set PREFECT_API_AUTH_STRING (README: Team setup); without it,
or with a wrong one, this exits 2 and says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
# What this serves, as "flow name/deployment name" (tests/unit/test_configs.py checks them against the flows).
SERVED = ("finetune/finetune", "retrain/retrain")


def deployment_specs(path: Path = PREFECT_YAML) -> dict[str, dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml by name."""
    import yaml

    document = yaml.safe_load(path.read_text())
    return {d["name"]: d for d in document["deployments"]}


def _schedules(spec: dict[str, Any]) -> list[Any]:
    from prefect.schedules import Cron

    return [
        Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
        for s in spec.get("schedules") or []
    ]


def _to_deployment(flow: Any, spec: dict[str, Any]) -> Any:
    return flow.to_deployment(
        name=spec["name"],
        description=spec.get("description"),
        tags=spec.get("tags"),
        parameters=spec.get("parameters") or {},
        schedules=_schedules(spec),
        concurrency_limit=spec.get("concurrency_limit"),
    )


def _pool_deployments(names: list[str]) -> list[str]:
    """Those of `names` that already exist as work-pool deployments on the server."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if deployment.work_pool_name:
                taken.append(f"{name} (work pool {deployment.work_pool_name})")
    return taken


def _refuse_unauthorized() -> NoReturn:
    """A server started with PREFECT_SERVER_API_AUTH_STRING refused us: say what to set (never echo a secret)."""
    from prefect.settings import PREFECT_API_URL

    print(
        f"error: the Prefect server at {PREFECT_API_URL.value() or 'of the current profile'} refused us "
        f"(401 Unauthorized): set PREFECT_API_AUTH_STRING=user:password to the server's PREFECT_SERVER_API_AUTH_STRING",
        file=sys.stderr,
    )
    raise SystemExit(2)


def main() -> None:
    """Serve both flows until interrupted. Like `ckptflow run`, flow runs start in the current directory:
    relative config_file paths (the retrain deployment's `examples/nightly.toml`) resolve from there,
    so run it from the repository root (`make serve` does)."""
    for key, value in (("PREFECT_LOGGING_EXTRA_LOGGERS", "ckptflow"), ("HF_HUB_OFFLINE", "1"), ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(key, value)
    from prefect import serve
    from prefect.exceptions import PrefectHTTPStatusError

    # Refusals first: a refused serve needs neither the flows nor what they import (~1.4 s).
    try:
        taken = _pool_deployments(list(SERVED))
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code != 401:
            raise
        _refuse_unauthorized()
    if taken:
        print(
            f"error: {', '.join(taken)} already deployed to a work pool (make deploy): run a worker for them "
            f"(prefect worker start --pool ckptflow-process), or delete them first "
            f"(prefect deployment delete finetune/finetune; prefect deployment delete retrain/retrain)",
            file=sys.stderr,
        )
        raise SystemExit(2)

    from flows.finetune import finetune
    from flows.retrain import retrain

    specs = deployment_specs()
    serve(_to_deployment(finetune, specs["finetune"]), _to_deployment(retrain, specs["retrain"]))


if __name__ == "__main__":
    main()
