"""Settings: the only place defaults live.

Sources, highest first: explicit overrides (CLI options) → environment (`CKPTFLOW_`,
nested with `__`) → `.env` → the TOML file given by `--config` → defaults. Field names
follow HF `TrainingArguments` where one exists.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ckptflow.errors import ConfigError
from ckptflow.paths import CHECKPOINTS_DIR, EXPORTS_DIR, QUARANTINE_DIR, RUNS_DIR, contained, validate_run_name

ENV_PREFIX = "CKPTFLOW_"
ENV_NESTED_DELIMITER = "__"

# Metrics that SFTTrainer's evaluation produces; anything else can never rank checkpoints.
EVAL_METRICS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy")

_toml_file: ContextVar[Path | None] = ContextVar("ckptflow_toml_file", default=None)


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Group):
    name_or_path: str = Field(
        "builtin:tiny-gpt2",
        description="Base model: `builtin:tiny-gpt2`, a local directory, or a hub id already in the local HF cache.",
    )
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_target_modules: list[str] | None = Field(
        None, description="Module names to adapt; empty = PEFT's default for the architecture."
    )
    max_length: int = Field(128, gt=0, description="Tokens per example after truncation.")


class DataSettings(_Group):
    train: str = Field(
        "builtin:demo",
        description="Training data: `builtin:demo`, a .jsonl/.csv/.parquet file, or a saved HF dataset directory.",
    )
    eval: str = Field(
        "", description="Eval data, same forms; empty = the dataset's eval split, else `eval_fraction` of train."
    )
    text_field: str = Field("text", min_length=1, description="Column holding the training text.")
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of train held out for eval when no eval data is given."
    )


class TrainSettings(_Group):
    epochs: float = Field(2, gt=0, description="HF num_train_epochs; ignored when max_steps > 0.")
    max_steps: int = Field(-1, description="Total optimizer steps; -1 = derive from epochs.")
    batch_size: int = Field(2, gt=0, description="HF per_device_train_batch_size (and eval).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (linear decay).")
    seed: int = Field(42, description="Seed for weights init of LoRA, data order and dropout.")
    logging_steps: int = Field(1, gt=0, description="Log train loss every N steps.")
    chunk_steps: int = Field(0, ge=0, description="Optimizer steps per Prefect task; 0 = auto (a few chunks).")
    retries: int = Field(2, ge=0, description="Prefect retries per chunk; each resumes from the ledger.")
    retry_delay_seconds: float = Field(5, ge=0, description="Seconds between retries of a chunk.")
    launcher: Literal["inprocess", "subprocess", "torchrun"] = Field(
        "inprocess", description="Where a chunk runs: this process, a child process, or torchrun (DDP)."
    )
    nproc_per_node: int = Field(2, gt=0, description="Processes per node for launcher=torchrun.")

    @model_validator(mode="after")
    def _max_steps_valid(self) -> TrainSettings:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be a positive number of steps, or -1 to derive it from epochs")
        return self


class CheckpointSettings(_Group):
    save_strategy: Literal["steps", "epoch"] = Field("steps", description="When HF saves: every save_steps or every epoch.")
    save_steps: int = Field(2, gt=0, description="Save every N optimizer steps (save_strategy=steps).")
    eval_strategy: Literal["steps", "epoch", "no"] = Field("steps", description="When to evaluate; `no` disables metrics.")
    eval_steps: int = Field(2, gt=0, description="Evaluate every N optimizer steps (eval_strategy=steps).")
    save_total_limit: int | None = Field(2, gt=0, description="How many checkpoints retention keeps (plus protected ones).")
    retention: Literal["best", "recent"] = Field(
        "best", description="`best`: keep the save_total_limit best by metric; `recent`: the most recent."
    )
    metric_for_best_model: str = Field("eval_loss", description="Metric that ranks checkpoints.")
    greater_is_better: bool = Field(False, description="Direction of metric_for_best_model.")
    keep_every_steps: int | None = Field(None, gt=0, description="Also keep every checkpoint whose step is a multiple of this.")
    max_total_bytes: int | None = Field(None, gt=0, description="Disk budget for all kept checkpoints of a run.")
    min_free_bytes: int | None = Field(
        None, ge=0, description="Refuse a save that would leave less free disk; empty = 64 MiB margin."
    )

    @property
    def metric_key(self) -> str:
        """The metric as recorded in eval logs (HF prefixes `eval_`)."""
        m = self.metric_for_best_model
        return m if m.startswith("eval_") else f"eval_{m}"

    @property
    def evaluates(self) -> bool:
        return self.eval_strategy != "no"


class ExportSettings(_Group):
    merge: bool = Field(True, description="Merge LoRA into the base weights; false = export the adapter only.")
    promotion_margin: float = Field(
        0.0, ge=0.0, description="retrain: challenger must beat the champion's metric by at least this much."
    )


class FaultSettings(_Group):
    """Fault injection for tests and drills; off by default."""

    at_step: int | None = Field(None, gt=0, description="Fail when training reaches this optimizer step.")
    mode: Literal["raise", "kill"] = Field("raise", description="`raise` an exception, or SIGKILL the training process.")
    times: int = Field(1, ge=0, description="Fail only the first N attempts that reach at_step.")
    pause_at: (
        Literal[
            "step-end",
            "save-begun",
            "mid-save",
            "files-written",
            "manifest-written",
            "prune-marked",
            "prune-renamed",
            "export-written",
            "export-swapped",
        ]
        | None
    ) = Field(None, description="Sleep at this point (see ckptflow.faults) so a drill can watch the state and kill.")
    pause_step: int | None = Field(None, gt=0, description="Pause only at this step; empty = the first time the point is reached.")
    pause_seconds: float = Field(30.0, ge=0, description="How long a pause lasts (seconds).")


class Settings(BaseSettings):
    """All of ckptflow's configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_file=".env",
        env_ignore_empty=True,  # `KEY=` in .env means "default", so .env.example can be copied as is
        extra="ignore",
        validate_assignment=True,
        nested_model_default_partial_update=True,
    )

    home: Path = Field(Path(".ckptflow"), description="Root for runs, exports, the data cache and the default ledger.")
    ledger_url: str | None = Field(None, description="SQLAlchemy URL; empty = sqlite:///$CKPTFLOW_HOME/ledger.db.")
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    export: ExportSettings = ExportSettings()
    fault: FaultSettings = FaultSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        toml_file = _toml_file.get()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Settings:
        ck = self.checkpoint
        if ck.retention == "best" and not ck.evaluates:
            raise ValueError(
                "retention=best ranks checkpoints by a metric, but evaluation is disabled: "
                "set CKPTFLOW_CHECKPOINT__EVAL_STRATEGY=steps or CKPTFLOW_CHECKPOINT__RETENTION=recent"
            )
        if ck.evaluates and ck.metric_key not in EVAL_METRICS:
            raise ValueError(
                f"metric_for_best_model={ck.metric_for_best_model!r} is not produced by evaluation "
                f"(it produces {', '.join(EVAL_METRICS)}): change CKPTFLOW_CHECKPOINT__METRIC_FOR_BEST_MODEL"
            )
        if (
            ck.evaluates
            and ck.save_strategy == "steps"
            and ck.eval_strategy == "steps"
            and ck.save_steps % ck.eval_steps != 0
        ):
            raise ValueError(
                f"save_steps={ck.save_steps} is not a multiple of eval_steps={ck.eval_steps}, so saved checkpoints "
                "would have no metric to rank them: change CKPTFLOW_CHECKPOINT__SAVE_STEPS or "
                "CKPTFLOW_CHECKPOINT__EVAL_STEPS"
            )
        if ck.evaluates and ck.save_strategy != ck.eval_strategy:
            raise ValueError(
                f"save_strategy={ck.save_strategy} but eval_strategy={ck.eval_strategy}: checkpoints would have no "
                "metric; make CKPTFLOW_CHECKPOINT__SAVE_STRATEGY and CKPTFLOW_CHECKPOINT__EVAL_STRATEGY equal"
            )
        return self

    # -- derived values ------------------------------------------------------------
    @property
    def ledger(self) -> str:
        """The effective ledger URL."""
        if self.ledger_url:
            return self.ledger_url
        return f"sqlite:///{(self.home / 'ledger.db').resolve()}"

    # Every path below is built by paths.contained: it cannot leave the home, whatever the name.
    def run_dir(self, run_name: str) -> Path:
        return contained(self.home / RUNS_DIR, validate_run_name(run_name, option="the run name"))

    def checkpoints_dir(self, run_name: str) -> Path:
        return contained(self.run_dir(run_name), CHECKPOINTS_DIR)

    def quarantine_dir(self, run_name: str) -> Path:
        return contained(self.run_dir(run_name), QUARANTINE_DIR)

    def export_dir(self, run_name: str) -> Path:
        return contained(self.home / EXPORTS_DIR, validate_run_name(run_name, option="the run name"))

    def warnings(self) -> list[str]:
        """Legal but risky choices, each with what to change."""
        out: list[str] = []
        ck = self.checkpoint
        if ck.save_total_limit is None:
            out.append(
                "no save_total_limit: every checkpoint is kept and the disk may fill; "
                "set CKPTFLOW_CHECKPOINT__SAVE_TOTAL_LIMIT"
            )
        if ck.save_strategy == "epoch" and self.train.max_steps == -1 and self.train.epochs <= 1:
            out.append(
                "save_strategy=epoch with one epoch: the only checkpoint is at the end, no mid-run recovery point; "
                "set CKPTFLOW_CHECKPOINT__SAVE_STRATEGY=steps"
            )
        return out

    def training_fingerprint(self) -> str:
        """Digest of everything that changes the trained weights (not home, ledger, retries, retention)."""
        return hashlib.sha256(json.dumps(self.fingerprint_inputs(), sort_keys=True).encode()).hexdigest()

    def fingerprint_inputs(self) -> dict[str, Any]:
        """The settings that change the trained weights, by group (what `training_fingerprint` hashes)."""
        return {
            "model": self.model.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "train": self.train.model_dump(
                mode="json", exclude={"chunk_steps", "retries", "retry_delay_seconds", "launcher", "nproc_per_node"}
            ),
            "checkpoint": self.checkpoint.model_dump(
                mode="json", include={"save_strategy", "save_steps", "eval_strategy", "eval_steps"}
            ),
        }

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def env_var_for(loc: tuple[Any, ...]) -> str:
    """`("checkpoint", "save_steps")` → `CKPTFLOW_CHECKPOINT__SAVE_STEPS`."""
    parts = [str(p).upper() for p in loc if not isinstance(p, int)]
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(parts)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the env var (and TOML key) to change."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if isinstance(p, str))
        msg = err["msg"].removeprefix("Value error, ")
        if loc:
            key = ".".join(loc)
            lines.append(f"{key}: {msg} (got {err.get('input')!r}); change {env_var_for(loc)} or `{key}` in the config file")
        else:
            lines.append(msg)
    return "\n".join(lines)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from all sources; raise ConfigError (exit 2) with a readable message.

    `overrides` are the highest-priority values (CLI options), nested as dicts:
    `load_settings(train={"max_steps": 10})`.
    """
    path = Path(config_file) if config_file else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing TOML file to --config")
    token = _toml_file.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError("invalid settings:\n" + describe_validation_error(exc)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    finally:
        _toml_file.reset(token)


def settings_from_json(config: dict[str, Any]) -> Settings:
    """Rebuild the exact settings recorded in the ledger (no env, no files)."""
    return Settings.model_validate(config)


def steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch, as HF Trainer counts them (single process)."""
    batches = math.ceil(num_examples / batch_size)
    return max(1, math.ceil(batches / grad_accum))
