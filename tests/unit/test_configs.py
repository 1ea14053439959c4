"""Every shipped config loads: examples/*.toml into the settings, and every deployment in
deployments/prefect.yaml — its parameters through the flow's pydantic parameter models
(as the Prefect server validates them) and then into the settings."""

from __future__ import annotations

import tomllib
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import validate

from ckptflow.params import FinetuneOverrides, settings_overrides
from ckptflow.settings import Settings, load_settings
from deployments.serve import SERVED, _to_deployment, deployment_specs
from flows.finetune import finetune, resolve_settings
from flows.retrain import retrain

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))
FLOWS = {"flows/finetune.py:finetune": finetune, "flows/retrain.py:retrain": retrain}
POOL = "ckptflow-process"
DEPLOYMENTS = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_there_is_something_to_check():
    assert len(EXAMPLES) >= 2
    assert {d["name"] for d in DEPLOYMENTS} == {"finetune", "retrain"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path, home):
    # Unknown top-level tables would be ignored silently (groups forbid unknown keys themselves).
    assert set(tomllib.loads(path.read_text())) <= set(Settings.model_fields), path
    settings = load_settings(path)
    assert settings.training_fingerprint()


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_parameters_load(deployment, home):
    flow = FLOWS[deployment["entrypoint"]]
    parameters = deployment.get("parameters") or {}
    validate(parameters, parameter_schema(flow).model_dump_for_openapi(), raise_on_error=True)
    coerced = flow.validate_parameters(parameters)
    config = coerced.get("config_file")
    if config:
        assert (REPO / config).is_file(), f"{deployment['name']}: config_file {config} is not in the repository"
    settings = resolve_settings(str(REPO / config) if config else None, coerced.get("overrides"))
    assert settings.home == home.resolve()


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_runs_on_the_process_pool_from_the_checkout(deployment):
    assert deployment["work_pool"]["name"] == POOL
    assert f"POOL={POOL}" in (REPO / "deployments" / "deploy.sh").read_text()
    assert Path(REPO / deployment["entrypoint"].split(":")[0]).is_file()
    (pull,) = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    assert pull == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ checkout.stdout }}"}}


def test_retrain_is_scheduled_nightly_in_an_explicit_time_zone():
    (schedule,) = next(d for d in DEPLOYMENTS if d["name"] == "retrain")["schedules"]
    minute, hour, *every_day = schedule["cron"].split()
    assert every_day == ["*", "*", "*"] and minute.isdigit() and hour.isdigit()
    assert ZoneInfo(schedule["timezone"])
    assert schedule.get("active", True)


def test_serve_builds_the_same_deployments_from_the_yaml():
    specs = deployment_specs()
    # The names serve checks before it imports the flows are those it serves.
    assert SERVED == tuple(f"{flow.name}/{name}" for flow, name in ((finetune, "finetune"), (retrain, "retrain")))
    for flow, name in ((finetune, "finetune"), (retrain, "retrain")):
        served = _to_deployment(flow, specs[name])
        assert served.name == name and served.parameters == (specs[name].get("parameters") or {})
        assert served.concurrency_limit == specs[name].get("concurrency_limit")
        crons = [(s.schedule.cron, s.schedule.timezone) for s in served.schedules]
        assert crons == [(s["cron"], s["timezone"]) for s in specs[name].get("schedules") or []]


def test_overrides_cover_every_settings_field_with_a_description():
    for group, model in FinetuneOverrides.model_fields.items():
        settings_group = Settings.model_fields[group].annotation
        override_group = model.annotation.__args__[0]  # `XOverrides | None`
        assert set(override_group.model_fields) == set(settings_group.model_fields), group
        assert all(f.description for f in override_group.model_fields.values()), group


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (None, {}),
        ({}, {}),
        ({"train": {"chunk_steps": 2, "learning_rate": None}}, {"train": {"chunk_steps": 2}}),
        ({"fault": {"at_step": 3}, "checkpoint": {}}, {"fault": {"at_step": 3}, "checkpoint": {}}),
    ],
)
def test_only_filled_in_overrides_reach_the_settings(overrides, expected):
    assert settings_overrides(overrides) == expected


@pytest.mark.parametrize(
    "parameters",
    [
        {"overrides": {"train": {"chunk_stepz": 2}}},  # typo in a field
        {"overrides": {"trian": {}}},  # typo in a group
        {"overrides": {"train": {"chunk_steps": -1}}},  # constraint from the settings model
        {"overrides": {"train": {"launcher": "slurm"}}},  # not one of the choices
    ],
)
def test_bad_parameters_are_refused_before_the_flow_runs(parameters):
    with pytest.raises(ParameterTypeError):
        finetune.validate_parameters(parameters)
