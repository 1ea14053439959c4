"""Load, split, fingerprint and tokenize training data; cache the tokenized result on disk.

Tokenization matches what TRL's `SFTTrainer` does for a plain-text dataset (text + EOS
token, tokenized with the model's tokenizer, truncated to `max_length` keeping the start),
so eval losses mean the same as if SFTTrainer had tokenized the text itself. The result
has an `input_ids` column, which makes SFTTrainer skip its own tokenization (it still
builds `labels` = `input_ids`).

Bad data fails here with a DataError naming the file and the line/row.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptflow.builtin import BUILTIN_DATASETS, BUILTIN_PREFIX, builtin_texts
from ckptflow.errors import CkptflowError, DataError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from ckptflow.settings import DataSettings

# Bump when tokenization/formatting changes: it is part of every fingerprint (new cache entry).
FORMAT_VERSION = 1
TRAIN_ENV = "CKPTFLOW_DATA__TRAIN"
EVAL_ENV = "CKPTFLOW_DATA__EVAL"
TEXT_FIELD_ENV = "CKPTFLOW_DATA__TEXT_FIELD"
SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".parquet")
# Split names of a saved DatasetDict used as its eval split, in order of preference.
EVAL_SPLITS = ("validation", "eval", "test")
TRAIN_SPLIT = "train"
# In the cache entry: the DatasetDict's split names and our metadata file.
CACHE_TRAIN, CACHE_EVAL, CACHE_META = "train", "eval", "ckptflow-data.json"


@dataclass(frozen=True)
class PreparedData:
    """Tokenized train/eval sets (column `input_ids`), their fingerprint, and where they came from."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    fingerprint: str
    train_rows: int
    eval_rows: int
    source: str


# -- loading -----------------------------------------------------------------------------


def _check_text(value: Any, where: str, text_field: str, fields: Iterable[str]) -> str:
    if text_field not in fields:
        names = ", ".join(str(f) for f in fields) or "none"
        raise DataError(f"{where} has no field {text_field!r} (fields: {names}): set {TEXT_FIELD_ENV}")
    if value is None:
        raise DataError(f"{where}: field {text_field!r} is missing or null, expected a non-empty string")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a non-empty string")
    if not value.strip():
        raise DataError(f"{where}: field {text_field!r} is empty")
    return value


def _read_jsonl(path: Path, label: str, text_field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{label} line {lineno}: invalid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise DataError(f"{label} line {lineno}: expected a JSON object, got {type(row).__name__}")
            texts.append(_check_text(row.get(text_field), f"{label} line {lineno}", text_field, row))
    return texts


def _read_csv(path: Path, label: str, text_field: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if fields and text_field not in fields:
            raise DataError(f"{label} line 1 has no field {text_field!r} (fields: {', '.join(fields)}): set {TEXT_FIELD_ENV}")
        try:
            return [_check_text(row.get(text_field), f"{label} line {reader.line_num}", text_field, fields) for row in reader]
        except csv.Error as exc:
            raise DataError(f"{label} line {reader.line_num}: invalid CSV ({exc})") from None


def _rows_texts(rows: Iterable[dict[str, Any]], columns: list[str], label: str, text_field: str) -> list[str]:
    if text_field not in columns:
        raise DataError(f"{label} has no field {text_field!r} (fields: {', '.join(columns)}): set {TEXT_FIELD_ENV}")
    return [
        _check_text(row[text_field], f"{label} row {i} (0-based)", text_field, columns) for i, row in enumerate(rows)
    ]


def _read_parquet(path: Path, label: str, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-parquet content
        raise DataError(f"{label}: cannot read parquet ({exc})") from None
    column = table.column(text_field).to_pylist() if text_field in table.column_names else None
    rows = ({text_field: v} for v in column or [])
    return _rows_texts(rows, table.column_names, label, text_field)


def _read_saved_dataset(path: Path, label: str, text_field: str) -> tuple[list[str], list[str] | None]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(
            f"{label} is a directory but not a dataset saved with Dataset.save_to_disk ({exc})"
        ) from None

    def texts_of(ds: datasets.Dataset, split_label: str) -> list[str]:
        column = ds[text_field] if text_field in ds.column_names else []
        return _rows_texts(({text_field: v} for v in column), ds.column_names, split_label, text_field)

    if isinstance(loaded, datasets.DatasetDict):
        if TRAIN_SPLIT not in loaded:
            raise DataError(f"{label} has no {TRAIN_SPLIT!r} split (splits: {', '.join(loaded)})")
        eval_split = next((s for s in EVAL_SPLITS if s in loaded), None)
        train = texts_of(loaded[TRAIN_SPLIT], f"{label} split {TRAIN_SPLIT!r}")
        eval_ = texts_of(loaded[eval_split], f"{label} split {eval_split!r}") if eval_split else None
        return train, eval_
    return texts_of(loaded, label), None


def load_texts(spec: str, text_field: str, *, env_var: str = TRAIN_ENV) -> tuple[list[str], list[str] | None]:
    """(train texts, the source's own eval split or None) of a data spec.

    `spec`: `builtin:demo`, `builtin:demo-large`, a .jsonl / .csv / .parquet file, or a
    directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (split
    `train`, eval from `validation`/`eval`/`test`). `env_var` is named in messages as the
    setting to change. Raises DataError naming the file and line/row.
    """
    if spec.startswith(BUILTIN_PREFIX):
        texts = builtin_texts(spec)
        if texts is None:
            raise DataError(f"unknown built-in dataset {spec!r} (known: {', '.join(BUILTIN_DATASETS)}): set {env_var}")
        train, eval_ = texts
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            tried = "" if str(path.absolute()) == spec else f" (looked for {path.absolute()})"
            raise DataError(f"data file {spec} does not exist: set {env_var} to an existing file{tried}")
        if path.is_dir():
            train, eval_ = _read_saved_dataset(path, spec, text_field)
        else:
            readers = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
            reader = readers.get(path.suffix.lower())
            if reader is None:
                raise DataError(
                    f"data file {spec} has unsupported extension {path.suffix or '(none)'!r} "
                    f"(supported: {', '.join(SUPPORTED_SUFFIXES)}, or a saved HF dataset directory): set {env_var}"
                )
            try:
                train, eval_ = reader(path, spec, text_field), None
            except UnicodeDecodeError as exc:
                raise DataError(f"{spec}: not UTF-8 text ({exc})") from None
    if not train:
        raise DataError(f"{spec} contains no rows: set {env_var} to a dataset with at least one text")
    if eval_ is not None and not eval_:
        eval_ = None
    return train, eval_


# -- splitting and fingerprinting ------------------------------------------------------------


def _hold_out(train: list[str], fraction: float, seed: int) -> tuple[list[str], list[str] | None]:
    """Split off `fraction` of train (≥ 1 row, ≤ all but one) by a seeded shuffle; both keep file order."""
    if fraction <= 0 or len(train) < 2:
        return train, None
    n_eval = min(len(train) - 1, max(1, round(len(train) * fraction)))
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [t for i, t in enumerate(train) if i not in held], [t for i, t in enumerate(train) if i in held]


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what makes token ids: the tokenizer's definition and its EOS token.

    Runtime truncation/padding state is excluded, so calling the tokenizer never changes it.
    """
    from ckptflow.tokenizer_files import identity  # one rule, also read from files (tokenizer_files)

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
    else:  # slow (Python) tokenizer
        spec = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    return identity(spec, tokenizer.eos_token)


def data_fingerprint(
    train: list[str], eval_: list[str] | None, *, tokenizer_id: str, text_field: str, max_length: int
) -> str:
    """Content-based digest: same texts + tokenizer + formatting → same fingerprint, wherever the files live."""
    h = hashlib.sha256()
    header = {"format": FORMAT_VERSION, "tokenizer": tokenizer_id, "text_field": text_field, "max_length": max_length}
    h.update(json.dumps(header, sort_keys=True).encode())
    for name, texts in (("train", train), ("eval", eval_)):
        h.update(f"\0{name}:{'none' if texts is None else len(texts)}".encode())
        for text in texts or []:
            h.update(b"\0" + text.encode("utf-8"))
    return h.hexdigest()


# -- tokenizing and caching ------------------------------------------------------------------


def tokenize_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[list[int]]:
    """Token ids exactly as SFTTrainer makes them for a "text" column: text + eos, keep the first max_length."""
    eos = tokenizer.eos_token
    with_eos = [t if eos is None or t.endswith(eos) else t + eos for t in texts]
    return [ids[:max_length] for ids in tokenizer(with_eos)["input_ids"]]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No datasets progress bars while we build/load the cache; the caller's setting is restored."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _write_cache(entry: Path, train_ids: list[list[int]], eval_ids: list[list[int]] | None, meta: dict) -> None:
    """Save to a temporary sibling, then rename into place; a concurrent writer's entry wins."""
    import datasets

    splits = {CACHE_TRAIN: datasets.Dataset.from_dict({"input_ids": train_ids})}
    if eval_ids is not None:
        splits[CACHE_EVAL] = datasets.Dataset.from_dict({"input_ids": eval_ids})
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / CACHE_META).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(entry: Path) -> tuple[datasets.Dataset, datasets.Dataset | None, dict] | None:
    """The cached splits (memory-mapped from the entry) and metadata, or None if absent or unreadable."""
    import datasets

    if not (entry / CACHE_META).is_file():
        return None
    try:
        meta = json.loads((entry / CACHE_META).read_text())
        loaded = datasets.load_from_disk(str(entry))
    except Exception:
        shutil.rmtree(entry, ignore_errors=True)  # damaged entry: rebuild it
        return None
    return loaded[CACHE_TRAIN], loaded.get(CACHE_EVAL), meta


def _load_train_eval(data: DataSettings, seed: int) -> tuple[list[str], list[str] | None, str]:
    """1 train  2 eval: data.eval, else the source's eval split, else a seeded hold-out of train.

    A `data.eval` source that has its own eval split (builtin, saved DatasetDict) gives
    that split; otherwise all of its rows.
    """
    train, own_eval = load_texts(data.train, data.text_field, env_var=TRAIN_ENV)
    if data.eval:
        ev_train, ev_own = load_texts(data.eval, data.text_field, env_var=EVAL_ENV)
        eval_ = ev_own if ev_own is not None else ev_train
        return train, eval_, f"train {data.train} ({len(train)} rows), eval {data.eval} ({len(eval_)} rows)"
    if own_eval is not None:
        return train, own_eval, f"{data.train}: {len(train)} train rows, {len(own_eval)} eval rows from its eval split"
    train_kept, held = _hold_out(train, data.eval_fraction, seed)
    if held is None:
        return train_kept, None, f"{data.train}: {len(train_kept)} train rows, no eval"
    return (
        train_kept,
        held,
        f"{data.train}: {len(train_kept)} train rows, {len(held)} eval rows held out "
        f"(eval_fraction={data.eval_fraction}, seed={seed})",
    )


@dataclass(frozen=True)
class SplitSizes:
    """Rows of a run's train and eval sets after the split (what training will see)."""

    train_rows: int
    eval_rows: int
    source: str


def split_sizes(data: DataSettings, seed: int) -> SplitSizes:
    """Load and split like `prepare_data`, but tokenize and write nothing. Raises DataError."""
    train, eval_, source = _load_train_eval(data, seed)
    return SplitSizes(len(train), len(eval_ or []), source)


def check_split(data: DataSettings, sizes: SplitSizes, *, evaluates: bool) -> None:
    """Refuse a split training cannot use: no eval rows while evaluation is on (HF would fail mid-run).

    Every check of the number of rows lives here, so it runs before a run row is written.
    """
    if sizes.train_rows < 1:  # load_texts refuses an empty file; a hold-out always keeps one row
        raise DataError(f"{data.train} has no training rows left after the split: add rows to it ({TRAIN_ENV})")
    if not evaluates or sizes.eval_rows > 0:
        return
    turn_off = "or turn evaluation off with CKPTFLOW_CHECKPOINT__EVAL_STRATEGY=no and CKPTFLOW_CHECKPOINT__RETENTION=recent"
    if data.eval_fraction <= 0:
        raise DataError(
            f"eval_fraction=0 holds out no eval rows from {data.train}, but evaluation is on: set "
            f"CKPTFLOW_DATA__EVAL_FRACTION above 0 (e.g. 0.1), set {EVAL_ENV} to an eval file, {turn_off}"
        )
    raise DataError(
        f"{data.train} has {sizes.train_rows} row(s): too few to hold out an eval set "
        f"(eval_fraction={data.eval_fraction}) and still train: add rows (at least 2) to {TRAIN_ENV}, "
        f"set {EVAL_ENV} to an eval file, {turn_off}"
    )


def fingerprint_only(data: DataSettings, *, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int) -> str:
    """The fingerprint `prepare_data` would give, without tokenizing or touching the cache."""
    return fingerprint_of(data, tokenizer_id=tokenizer_identity(tokenizer), max_length=max_length, seed=seed)


def fingerprint_of(data: DataSettings, *, tokenizer_id: str, max_length: int, seed: int) -> str:
    """`fingerprint_only` given the tokenizer's identity (no transformers import: see tokenizer_files)."""
    train, eval_, _ = _load_train_eval(data, seed)
    return data_fingerprint(train, eval_, tokenizer_id=tokenizer_id, text_field=data.text_field, max_length=max_length)


def prepare_data(
    data: DataSettings, *, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int, cache_dir: Path
) -> PreparedData:
    """Load, split, fingerprint and tokenize; reuse `cache_dir/<fingerprint>/` when it exists.

    Returned datasets are memory-mapped from the cache entry (column `input_ids`), ready
    for SFTTrainer. Raises DataError for missing or malformed data. Datasets progress bars
    are off while this runs.
    """
    train, eval_, source = _load_train_eval(data, seed)
    fingerprint = data_fingerprint(
        train, eval_, tokenizer_id=tokenizer_identity(tokenizer), text_field=data.text_field, max_length=max_length
    )
    entry = Path(cache_dir) / fingerprint
    with _quiet_datasets():
        cached = _read_cache(entry)
        if cached is None:
            eval_ids = tokenize_texts(eval_, tokenizer, max_length) if eval_ is not None else None
            meta = {"fingerprint": fingerprint, "source": source, "max_length": max_length, "format": FORMAT_VERSION}
            _write_cache(entry, tokenize_texts(train, tokenizer, max_length), eval_ids, meta)
            cached = _read_cache(entry)
            if cached is None:
                raise CkptflowError(f"tokenized data cache {entry} could not be read back after writing it")
    train_ds, eval_ds, _ = cached
    return PreparedData(
        train=train_ds,
        eval=eval_ds,
        fingerprint=fingerprint,
        train_rows=len(train_ds),
        eval_rows=len(eval_ds) if eval_ds is not None else 0,
        source=source,
    )
