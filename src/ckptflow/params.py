"""Flow parameters as pydantic models: what the Prefect UI renders as a typed form.

Each override group mirrors a settings group field by field, every field optional: a
field left empty keeps the value from the config file, the environment or the defaults.
Types, constraints and descriptions are taken from the settings models, so the form, the
TOML files and `.env.example` can never disagree.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, create_model

from ckptflow.paths import RUN_NAME_MAX_LENGTH, RUN_NAME_PATTERN, RUN_NAME_RULE, InvalidRunNameError, validate_run_name
from ckptflow.settings import (
    CheckpointSettings,
    DataSettings,
    ExportSettings,
    FaultSettings,
    ModelSettings,
    TrainSettings,
)

__all__ = [
    "CheckpointOverrides",
    "DataOverrides",
    "ExportOverrides",
    "FaultOverrides",
    "FinetuneOverrides",
    "ModelOverrides",
    "RunName",
    "TrainOverrides",
    "settings_overrides",
]


def _run_name(name: str) -> str:
    try:
        return validate_run_name(name, option="the run_name parameter")
    except InvalidRunNameError as exc:  # pydantic reports ValueError as a validation error
        raise ValueError(str(exc)) from None


# The run-name grammar as a parameter type: the pattern and length go into the JSON schema,
# so the Prefect UI form refuses a bad name; the validator gives the full message elsewhere.
RunName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=RUN_NAME_MAX_LENGTH, pattern=RUN_NAME_PATTERN),
    AfterValidator(_run_name),
    Field(description=RUN_NAME_RULE[0].upper() + RUN_NAME_RULE[1:] + "."),
]


class _Overrides(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _optional_group(group: type[BaseModel], name: str) -> type[_Overrides]:
    """`group` with every field `T | None = None` (same constraints and description)."""
    fields: dict[str, Any] = {}
    for field_name, info in group.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[field_name] = (Optional[annotation], Field(None, description=info.description))  # noqa: UP045
    doc = f"Overrides of `{group.__name__}`; empty fields keep the configured value."
    return create_model(name, __base__=_Overrides, __doc__=doc, **fields)


ModelOverrides = _optional_group(ModelSettings, "ModelOverrides")
DataOverrides = _optional_group(DataSettings, "DataOverrides")
TrainOverrides = _optional_group(TrainSettings, "TrainOverrides")
CheckpointOverrides = _optional_group(CheckpointSettings, "CheckpointOverrides")
ExportOverrides = _optional_group(ExportSettings, "ExportOverrides")
FaultOverrides = _optional_group(FaultSettings, "FaultOverrides")


class FinetuneOverrides(_Overrides):
    """Settings to change for one flow run, on top of the config file, environment and defaults."""

    model: ModelOverrides | None = Field(None, description="Base model and LoRA adapter.")  # type: ignore[valid-type]
    data: DataOverrides | None = Field(None, description="Training and eval data.")  # type: ignore[valid-type]
    train: TrainOverrides | None = Field(  # type: ignore[valid-type]
        None, description="Optimization, chunking into Prefect tasks, retries."
    )
    checkpoint: CheckpointOverrides | None = Field(  # type: ignore[valid-type]
        None, description="When to save and evaluate, and which checkpoints to keep."
    )
    export: ExportOverrides | None = Field(  # type: ignore[valid-type]
        None, description="Export and retrain promotion."
    )
    fault: FaultOverrides | None = Field(  # type: ignore[valid-type]
        None, description="Fault injection for drills and tests (off when empty)."
    )


def settings_overrides(overrides: FinetuneOverrides | dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments for `load_settings`: only the fields that were filled in.

    Accepts the model or its plain-dict form (a flow called with `.fn`, or JSON from the API).
    Raises pydantic.ValidationError for unknown groups or fields.
    """
    if overrides is None:
        return {}
    model = overrides if isinstance(overrides, FinetuneOverrides) else FinetuneOverrides.model_validate(overrides)
    return model.model_dump(exclude_none=True)
