"""Settings: the only place defaults live.

Sources, highest first: explicit overrides (CLI options) → environment (`CKPTFLOW_`,
nested with `__`) → `.env` → the TOML file given by `--config` → defaults. Field names
follow HF `TrainingArguments` where one exists. A name no setting has is refused (see
`config_sources`); relative paths in the TOML file resolve against the file's directory.
Every message names the env var and TOML key to change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from ckptflow import config_sources
from ckptflow.errors import ConfigError
from ckptflow.paths import CHECKPOINTS_DIR, EXPORTS_DIR, QUARANTINE_DIR, RUNS_DIR, contained, validate_run_name
from ckptflow.precision import AUTO, Precision, Switch
from ckptflow.precision import resolve as resolve_precision

ENV_PREFIX = "CKPTFLOW_"
ENV_NESTED_DELIMITER = "__"

# Metrics that SFTTrainer's evaluation produces; anything else can never rank checkpoints.
EVAL_METRICS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy")
# Metric names (after `eval_`) whose direction is known: lower is better / higher is better.
_LOWER_IS_BETTER = re.compile(r"(loss|perplexity|ppl)$")
_HIGHER_IS_BETTER = re.compile(r"(accuracy|f1|bleu|rouge\w*|exact_match)$")

# Upper bounds that only catch typos: no real run comes near them.
_MAX_COUNT = 2**31 - 1  # steps, limits, retries: 32-bit database ints (Prefect's retries); 2**31 steps take years
_MAX_SEED = 2**32 - 1  # numpy's seed range (HF set_seed seeds numpy too)
_MAX_WIDTH = 2**16  # LoRA rank/alpha: wider than any model layer; a rank can't exceed the layer width
_MAX_BATCH = 2**16  # sequences per device per micro-batch
_MAX_LENGTH = 2**24  # tokens per example: beyond the longest context of any released model
_MAX_NPROC = 1024  # processes per node for torchrun
_MAX_WAIT_SECONDS = 86_400.0  # a retry delay or drill pause longer than a day holds the flow (and lease) for a day

# The TOML file's data (relative paths already resolved), the lowest-priority source of this load.
_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("ckptflow_toml_data", default=None)

NonEmptyStr = Annotated[str, Field(min_length=1)]
# inf and nan pass `gt=0`-style bounds (or compare false) and then break the LR schedule or a sleep.
FiniteFloat = Annotated[float, AllowInfNan(False)]


def setting_name(*loc: str) -> str:
    """`("train", "max_steps")` → `CKPTFLOW_TRAIN__MAX_STEPS / `train.max_steps``: the env var and the TOML key."""
    return f"{env_var_for(loc)} / `{'.'.join(loc)}`"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Group):
    name_or_path: str = Field(
        "builtin:tiny-gpt2",
        min_length=1,
        description="Base model: `builtin:tiny-gpt2`, a local directory, or a hub id already in the local HF cache.",
    )
    lora_r: int = Field(8, gt=0, le=_MAX_WIDTH, description="LoRA rank.")
    lora_alpha: int = Field(16, gt=0, le=_MAX_WIDTH, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: FiniteFloat = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_target_modules: list[NonEmptyStr] | None = Field(
        None, description="Module names to adapt; empty = PEFT's default for the architecture."
    )
    lora_modules_to_save: list[NonEmptyStr] | None = Field(
        None,
        description="PEFT modules_to_save: modules trained in full and saved with the adapter (e.g. ln_f); empty = none.",
    )
    max_length: int = Field(128, gt=0, le=_MAX_LENGTH, description="Tokens per example after truncation.")


class DataSettings(_Group):
    train: str = Field(
        "builtin:demo",
        min_length=1,
        description="Training data: `builtin:demo`, a .jsonl/.csv/.parquet file, or a saved HF dataset directory.",
    )
    eval: str = Field(
        "", description="Eval data, same forms; empty = the dataset's eval split, else `eval_fraction` of train."
    )
    text_field: str = Field("text", min_length=1, description="Column holding the training text.")
    eval_fraction: FiniteFloat = Field(
        0.1, ge=0.0, lt=1.0, description="Share of train held out for eval when no eval data is given."
    )


# How an env var, .env or TOML string may spell a precision switch (pydantic's bool words, and auto).
_SWITCH_WORDS: dict[str, Switch] = {
    **dict.fromkeys(("true", "1", "yes", "on", "t", "y"), True),
    **dict.fromkeys(("false", "0", "no", "off", "f", "n"), False),
    AUTO: AUTO,
}


class TrainSettings(_Group):
    epochs: FiniteFloat = Field(2, gt=0, description="HF num_train_epochs; ignored when max_steps > 0.")
    max_steps: int = Field(-1, le=_MAX_COUNT, description="Total optimizer steps; -1 = derive from epochs.")
    batch_size: int = Field(2, gt=0, le=_MAX_BATCH, description="HF per_device_train_batch_size (and eval).")
    gradient_accumulation_steps: int = Field(1, gt=0, le=_MAX_COUNT, description="Micro-batches per optimizer step.")
    learning_rate: FiniteFloat = Field(2e-4, gt=0, description="Peak learning rate (linear decay).")
    seed: int = Field(42, ge=0, le=_MAX_SEED, description="Seed for weights init of LoRA, data order and dropout.")
    logging_steps: int = Field(1, gt=0, le=_MAX_COUNT, description="Log train loss every N steps.")
    chunk_steps: int = Field(
        0, ge=0, le=_MAX_COUNT, description="Optimizer steps per Prefect task; 0 = auto (a few chunks)."
    )
    retries: int = Field(2, ge=0, le=_MAX_COUNT, description="Prefect retries per chunk; each resumes from the ledger.")
    retry_delay_seconds: FiniteFloat = Field(
        5, ge=0, le=_MAX_WAIT_SECONDS, description="Seconds between retries of a chunk."
    )
    launcher: Literal["inprocess", "subprocess", "torchrun"] = Field(
        "inprocess", description="Where a chunk runs: this process, a child process, or torchrun (DDP)."
    )
    nproc_per_node: int = Field(
        1, gt=0, le=_MAX_NPROC, description="DDP ranks per node for launcher=torchrun (part of the run fingerprint)."
    )
    ddp_timeout_seconds: int = Field(
        1800,
        gt=0,
        le=_MAX_COUNT,
        description="HF ddp_timeout: seconds a rank waits for the others in a collective before the chunk fails.",
    )
    gradient_checkpointing: bool = Field(
        False, description="HF gradient_checkpointing: recompute activations in backward (less memory, slower)."
    )
    bf16: Switch = Field(
        AUTO,
        description="HF bf16: bfloat16 mixed precision; auto = TRL's default (on where the GPU or CPU runs bf16 natively).",
    )
    fp16: Switch = Field(
        AUTO, description="HF fp16: float16 mixed precision (CUDA GPUs); auto = on only on a GPU without bf16."
    )
    report_to: str = Field(
        "none",
        description="HF TrainingArguments.report_to: `none`, or integrations separated by commas "
        "(tensorboard, mlflow, wandb, ...); TensorBoard logs go to runs/<run>/tensorboard/.",
    )

    @field_validator("report_to")
    @classmethod
    def _known_integrations(cls, value: str) -> str:
        names = report_to_list(value)
        unknown = [n for n in names if n not in REPORT_INTEGRATIONS]
        if unknown:
            raise ValueError(f"unknown integration {', '.join(map(repr, unknown))}; HF knows {', '.join(REPORT_INTEGRATIONS)}")
        return ",".join(names) or "none"

    @field_validator("bf16", "fp16", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        # Here, not by the union: its error would name its members (`train.bf16.bool`), not the setting.
        if isinstance(value, str) and value.strip().lower() in _SWITCH_WORDS:
            return _SWITCH_WORDS[value.strip().lower()]
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ValueError("must be true, false or 'auto'")

    @property
    def precision(self) -> Precision:
        """fp32, bf16 or fp16: the switches resolved on this machine (see ckptflow.precision)."""
        return resolve_precision(self.bf16, self.fp16)

    @property
    def world_size(self) -> int:
        """Training processes: nproc_per_node under torchrun (one node), else 1."""
        return self.nproc_per_node if self.launcher == "torchrun" else 1

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step, over all ranks."""
        return self.batch_size * self.world_size * self.gradient_accumulation_steps

    @field_validator("max_steps")
    @classmethod
    def _max_steps_valid(cls, value: int) -> int:
        # A field validator (not a model one) so the error's location is `train.max_steps`.
        if value == 0 or value < -1:
            raise ValueError("must be a positive number of steps, or -1 to derive it from epochs")
        return value


# An URL scheme (RFC 3986): s3, gs, file, az, …
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


class CheckpointSettings(_Group):
    save_strategy: Literal["steps", "epoch"] = Field("steps", description="When HF saves: every save_steps or every epoch.")
    save_steps: int = Field(2, gt=0, le=_MAX_COUNT, description="Save every N optimizer steps (save_strategy=steps).")
    eval_strategy: Literal["steps", "epoch", "no"] = Field("steps", description="When to evaluate; `no` disables metrics.")
    eval_steps: int = Field(
        2, gt=0, le=_MAX_COUNT, description="Evaluate every N optimizer steps (eval_strategy=steps)."
    )
    save_total_limit: int | None = Field(
        2, gt=0, le=_MAX_COUNT, description="How many checkpoints retention keeps (plus protected ones)."
    )
    retention: Literal["best", "recent"] = Field(
        "best", description="`best`: keep the save_total_limit best by metric; `recent`: the most recent."
    )
    metric_for_best_model: str = Field("eval_loss", min_length=1, description="Metric that ranks checkpoints.")
    greater_is_better: bool = Field(False, description="Direction of metric_for_best_model.")
    keep_every_steps: int | None = Field(
        None, gt=0, le=_MAX_COUNT, description="Also keep every checkpoint whose step is a multiple of this."
    )
    max_total_bytes: int | None = Field(None, gt=0, description="Disk budget for all kept checkpoints of a run.")
    min_free_bytes: int | None = Field(
        None, ge=0, description="Refuse a save that would leave less free disk; empty = 64 MiB margin."
    )
    remote_url: str = Field(
        "",
        max_length=2048,
        description="fsspec URL every committed checkpoint is also uploaded to (s3://bucket/prefix, gs://…, file:///path); "
        "empty = none. S3 endpoint and keys the standard AWS way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …).",
    )

    @field_validator("remote_url")
    @classmethod
    def _remote_is_a_url(cls, value: str) -> str:
        # Only the form is checked here (no network): the bucket is checked when a run opens.
        value = value.strip()
        scheme, sep, rest = value.partition("://")
        if value and not (sep and _URL_SCHEME.fullmatch(scheme) and rest.strip("/")):
            raise ValueError("must be an fsspec URL with a bucket or directory: s3://bucket/prefix, gs://bucket/prefix, file:///path")
        return value

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
    promotion_margin: FiniteFloat = Field(
        0.0, ge=0.0, description="retrain: challenger must beat the champion's metric by at least this much."
    )
    keep_challengers: int = Field(
        3,
        ge=0,
        le=_MAX_COUNT,
        description="retrain: challenger exports kept besides the champion and the previous champion; older ones are pruned.",
    )


class FaultSettings(_Group):
    """Fault injection for tests and drills; off by default."""

    at_step: int | None = Field(
        None, gt=0, le=_MAX_COUNT, description="Fail when training reaches this optimizer step."
    )
    mode: Literal["raise", "kill"] = Field("raise", description="`raise` an exception, or SIGKILL the training process.")
    times: int = Field(1, ge=0, le=_MAX_COUNT, description="Fail only the first N attempts that reach at_step.")
    pause_at: (
        Literal[
            "step-end",
            "save-begun",
            "mid-save",
            "files-written",
            "files-hashed",
            "manifest-written",
            "commit-recorded",
            "prune-marked",
            "prune-renamed",
            "export-written",
            "export-swapped",
        ]
        | None
    ) = Field(None, description="Sleep at this point (see ckptflow.faults) so a drill can watch the state and kill.")
    pause_step: int | None = Field(
        None, gt=0, le=_MAX_COUNT, description="Pause only at this step; empty = the first time the point is reached."
    )
    pause_seconds: FiniteFloat = Field(
        30.0, ge=0, le=_MAX_WAIT_SECONDS, description="How long a pause lasts (seconds)."
    )


# Integrations HF TrainingArguments.report_to accepts (transformers.integrations); "all" = every installed one.
REPORT_INTEGRATIONS = (
    "all", "azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "mlflow",
    "neptune", "swanlab", "tensorboard", "trackio", "wandb",
)  # fmt: skip


def report_to_list(value: str) -> list[str]:
    """`"tensorboard, mlflow"` → ["tensorboard", "mlflow"]; `none` or empty → []."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


# Train settings that do not change the weights (where and how a chunk runs); the world size does,
# and enters the fingerprint as `train.world_size` (see fingerprint_inputs).
_NOT_IN_FINGERPRINT = {
    "chunk_steps", "retries", "retry_delay_seconds", "launcher", "nproc_per_node", "ddp_timeout_seconds", "report_to",
    "gradient_checkpointing",  # enters only when on (below): fingerprints recorded before it existed stay valid
    "bf16", "fp16",  # enter as the resolved precision, only when not fp32 (below)
}  # fmt: skip
# Precision switches: what a config recorded before a switch existed meant (both were off, fp32).
_RECORDED_SWITCH_DEFAULT = False
WORLD_SIZE_KEY = "world_size"

# Top-level settings that may hold credentials: never serialized (to_json), never echoed in errors.
SECRET_FIELDS = ("ledger_url",)


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
    ledger_url: SecretStr | None = Field(
        None,
        description="SQLAlchemy URL; empty = sqlite:///$CKPTFLOW_HOME/ledger.db. A secret: it may carry a password, "
        "so it is never written or shown in clear (see ckptflow.secrets).",
    )
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
        toml_data = _toml_data.get()
        if toml_data is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=toml_data))
        return tuple(sources)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Settings:
        problems = _contradictions(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- derived values ------------------------------------------------------------
    @property
    def ledger(self) -> str:
        """The effective ledger URL."""
        if self.ledger_url is not None and self.ledger_url.get_secret_value():
            return self.ledger_url.get_secret_value()
        return f"sqlite:///{(self.home / 'ledger.db').resolve()}"

    @property
    def ledger_shown(self) -> str:
        """The effective ledger URL as it may be shown to people: its password masked."""
        from ckptflow.secrets import mask_url

        return mask_url(self.ledger) or ""

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
        train = self.train.model_dump(mode="json", exclude=_NOT_IN_FINGERPRINT)
        if self.train.world_size > 1:  # only then: single-process runs keep the fingerprint they always had
            train[WORLD_SIZE_KEY] = self.train.world_size
        if self.train.gradient_checkpointing:
            train["gradient_checkpointing"] = True
        # The resolved precision, not the switches: `auto` means different weights on different machines.
        # fp32 adds nothing (fingerprints of fp32 runs never had it); bf16 as `bf16: true`, as before `auto`.
        precision = self.train.precision
        if precision != "fp32":
            train[precision] = True
        return {
            "model": self.model.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "train": train,
            "checkpoint": self.checkpoint.model_dump(
                mode="json", include={"save_strategy", "save_steps", "eval_strategy", "eval_steps"}
            ),
        }

    def to_json(self) -> dict[str, Any]:
        """Every setting as JSON, without the secret ones (SECRET_FIELDS): safe to record, log or send.

        The precision switches come out resolved (true/false, never `auto`): a run records, and every
        chunk's process trains with, the precision chosen here, whatever machine reads it later.
        """
        document = self.model_dump(mode="json", exclude=set(SECRET_FIELDS))
        precision = self.train.precision
        document["train"].update(bf16=precision == "bf16", fp16=precision == "fp16")
        return document


# Keys of fingerprint_inputs()["train"] that carry the precision (absent = fp32).
PRECISION_KEYS = ("bf16", "fp16")


def describe_precision_change(recorded_train: dict[str, Any], train: dict[str, Any]) -> str | None:
    """One line for a refusal when the precision differs between two fingerprint_inputs()["train"]:
    what changed and the variables that pin the recorded precision on this machine; None when equal."""
    before, after = (next((k for k in PRECISION_KEYS if t.get(k)), "fp32") for t in (recorded_train, train))
    if before == after:
        return None
    bf16, fp16 = env_var_for(("train", "bf16")), env_var_for(("train", "fp16"))
    if before == "fp32":
        pin = f"{bf16}=false" if resolve_precision(False, AUTO) == "fp32" else f"{bf16}=false {fp16}=false"
    else:
        pin = f"{env_var_for(('train', before))}=true"
    return (
        f"  precision: {before} -> {after} ({bf16} / {fp16}; `auto` resolves on the machine that trains): "
        f"resume in {before} with {pin}"
    )


def _metric_higher_is_better(metric_key: str) -> bool | None:
    """True/False when the metric's name says its direction (`*_loss`, perplexity / accuracy, f1…), else None."""
    name = metric_key.removeprefix("eval_")
    if _LOWER_IS_BETTER.search(name):
        return False
    if _HIGHER_IS_BETTER.search(name):
        return True
    return None


def _contradictions(s: Settings) -> list[str]:
    """Settings that are valid one by one but cannot work together, each naming every variable involved."""
    out: list[str] = []
    ck, tr = s.checkpoint, s.train
    metric = setting_name("checkpoint", "metric_for_best_model")
    direction = setting_name("checkpoint", "greater_is_better")
    if ck.retention == "best" and not ck.evaluates:
        out.append(
            "retention=best ranks checkpoints by a metric, but eval_strategy=no disables evaluation: "
            f"set {setting_name('checkpoint', 'eval_strategy')} to steps, "
            f"or {setting_name('checkpoint', 'retention')} to recent"
        )
    if ck.evaluates and ck.metric_key not in EVAL_METRICS:
        out.append(
            f"metric_for_best_model={ck.metric_for_best_model!r} is not produced by evaluation "
            f"(it produces {', '.join(EVAL_METRICS)}): change {metric}"
        )
    higher = _metric_higher_is_better(ck.metric_key)
    if higher is not None and higher != ck.greater_is_better:
        better = "higher" if higher else "lower"
        out.append(
            f"metric_for_best_model={ck.metric_for_best_model!r} is better when {better}, but "
            f"greater_is_better={str(ck.greater_is_better).lower()} would rank the worst checkpoint as best: "
            f"set {direction} to {str(higher).lower()}, or change {metric}"
        )
    if ck.evaluates and ck.save_strategy == "steps" == ck.eval_strategy and ck.save_steps % ck.eval_steps != 0:
        out.append(
            f"save_steps={ck.save_steps} is not a multiple of eval_steps={ck.eval_steps}, so saved checkpoints "
            f"would have no metric to rank them: change {setting_name('checkpoint', 'save_steps')} or "
            f"{setting_name('checkpoint', 'eval_steps')}"
        )
    if ck.evaluates and ck.save_strategy != ck.eval_strategy:
        out.append(
            f"save_strategy={ck.save_strategy} but eval_strategy={ck.eval_strategy}: checkpoints would have no "
            f"metric; make {setting_name('checkpoint', 'save_strategy')} and "
            f"{setting_name('checkpoint', 'eval_strategy')} equal"
        )
    if tr.bf16 is True and tr.fp16 is True:
        out.append(
            f"bf16=true and fp16=true: a run trains in one precision; set {setting_name('train', 'fp16')} "
            f"or {setting_name('train', 'bf16')} to false (or auto)"
        )
    if tr.max_steps > 0 and tr.logging_steps > tr.max_steps:
        out.append(
            f"logging_steps={tr.logging_steps} is more than max_steps={tr.max_steps}, so no training loss would "
            f"ever be logged: lower {setting_name('train', 'logging_steps')} "
            f"or raise {setting_name('train', 'max_steps')}"
        )
    return out


def env_var_for(loc: tuple[Any, ...]) -> str:
    """`("checkpoint", "save_steps")` → `CKPTFLOW_CHECKPOINT__SAVE_STEPS`."""
    parts = [str(p).upper() for p in loc if not isinstance(p, int)]
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(parts)


# Where a setting's value came from: dotted key → `environment`, `/abs/.env:3`, `/abs/c.toml:7`, ...
Origins = Callable[[tuple[str, ...]], "str | None"]
# Settings whose values are never echoed in messages (a URL may carry a password).
_SECRET_SETTINGS = {(name,) for name in SECRET_FIELDS}
_MENTIONED_KEY = re.compile(r"`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?)`")


def describe_validation_error(exc: ValidationError, origins: Origins | None = None) -> str:
    """One line per problem, each naming the env var and TOML key to change (and where the value came from)."""
    origins = origins or (lambda loc: None)
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if isinstance(p, str))
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a cross-field rule: its message names every setting involved
            lines.append(msg + _origins_of_mentioned(msg, origins))
            continue
        where = origins(loc)
        source = f" (from {where})" if where else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"`{'.'.join(loc)}`{source} is not a setting: remove it (.env.example lists every setting)")
            continue
        value = "" if loc in _SECRET_SETTINGS else f" = {err.get('input')!r}"
        lines.append(f"{'.'.join(loc)}{value}{source}: {msg}; change {setting_name(*loc)}")
    return "\n".join(lines)


def _origins_of_mentioned(msg: str, origins: Origins) -> str:
    found = []
    for key in dict.fromkeys(_MENTIONED_KEY.findall(msg)):
        where = origins(tuple(key.split(".")))
        if where:
            found.append(f"`{key}` from {where}")
    return f" [{'; '.join(found)}]" if found else ""


def _schema() -> config_sources.Schema:
    """Top-level setting → its group's field names (None for a plain setting)."""
    out: dict[str, frozenset[str] | None] = {}
    for name, info in Settings.model_fields.items():
        sub = getattr(info.annotation, "model_fields", None)
        out[name] = frozenset(sub) if sub else None
    return out


def _nested_keys(data: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(data, dict) or len(prefix) >= 2:
        return [prefix] if prefix else []
    return [k for key, value in data.items() for k in _nested_keys(value, (*prefix, str(key).lower()))] or [prefix]


def _origins(
    overrides: dict[str, Any], variables: list[config_sources.Variable], toml: config_sources.TomlConfig | None
) -> Origins:
    """Where each setting was set, highest-priority source first (as pydantic-settings merges them)."""
    found: dict[tuple[str, ...], str] = {}
    for key in _nested_keys(overrides):
        found.setdefault(key, "an override (CLI option or flow parameter)")
    for var in variables:  # environment first, then .env
        setting = config_sources.variable_setting(var.name, _schema(), ENV_PREFIX, ENV_NESTED_DELIMITER)
        if setting and var.value:
            found.setdefault(setting, f"{var.name} in {var.where}" if var.where == "environment" else var.where)
    if toml is not None:
        for key in _nested_keys(toml.data):
            found.setdefault(key, toml.where(*key))

    def lookup(loc: tuple[str, ...]) -> str | None:
        return found.get(loc) or found.get(loc[:1])

    return lookup


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from all sources; raise ConfigError (exit 2) with a readable message.

    `overrides` are the highest-priority values (CLI options, flow parameters), nested as
    dicts: `load_settings(train={"max_steps": 10})`. Every name any source sets must be a
    setting: unknown TOML sections/keys and CKPTFLOW_* variables are refused with where they
    were set and the nearest valid name. Relative paths in the TOML file resolve against
    the file's directory; values from the environment and `.env` against the working directory.
    """
    schema = _schema()
    toml = config_sources.read_toml(Path(config_file)) if config_file else None
    env_file = Path(Settings.model_config["env_file"])
    variables = config_sources.env_variables(os.environ, ENV_PREFIX) + config_sources.dotenv_variables(
        env_file, ENV_PREFIX
    )
    problems = config_sources.override_names(overrides, schema)
    problems += config_sources.unknown_variable_names(variables, schema, ENV_PREFIX, ENV_NESTED_DELIMITER)
    if toml is not None:
        problems += config_sources.unknown_toml_names(toml, schema)
    if problems:
        raise ConfigError("unknown settings:\n" + "\n".join(problems))
    token = _toml_data.set(config_sources.resolve_toml_paths(toml, schema) if toml is not None else None)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        origins = _origins(overrides, variables, toml)
        raise ConfigError("invalid settings:\n" + describe_validation_error(exc, origins)) from None
    except SettingsError as exc:  # a group set as one variable (CKPTFLOW_TRAIN) whose value is not JSON
        raise ConfigError(_undecodable_variable(exc)) from None
    finally:
        _toml_data.reset(token)


def _undecodable_variable(exc: SettingsError) -> str:
    m = re.search(r'field "(\w+)" from source "(\w+)"', str(exc))
    group, source = (m[1], m[2]) if m else ("train", "")
    where = "in .env" if "DotEnv" in source else "in the environment"
    return (
        f"{env_var_for((group,))} {where} is not valid JSON ({exc.__cause__ or exc}): a group set as one variable "
        f"takes a JSON object, e.g. {env_var_for((group,))}='{{\"{min(_schema()[group] or ['x'])}\": …}}'; "
        f"or set its fields one by one ({env_var_for((group, 'FIELD'))}=…)"
    )


def settings_from_json(config: dict[str, Any]) -> Settings:
    """Rebuild the exact settings recorded in the ledger (no env, no files).

    Raises ConfigError when a recorded config no longer passes today's validation.
    """
    train = config.get("train")
    if isinstance(train, dict):  # recorded before a precision switch existed: it was off
        config = {**config, "train": {"bf16": _RECORDED_SWITCH_DEFAULT, "fp16": _RECORDED_SWITCH_DEFAULT, **train}}
    try:
        return Settings.model_validate(config)
    except ValidationError as exc:
        raise ConfigError(
            "the settings recorded for this run no longer pass validation:\n"
            + describe_validation_error(exc)
            + "\nstart a new run (--new) with valid settings"
        ) from None


def steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch, as HF Trainer counts them.

    Under DDP each rank gets ceil(batches / world_size) micro-batches (accelerate shards whole
    batches and pads the last round), so an epoch is ceil(examples / global batch) steps.
    """
    batches_per_rank = math.ceil(math.ceil(num_examples / batch_size) / world_size)
    return max(1, math.ceil(batches_per_rank / grad_accum))
