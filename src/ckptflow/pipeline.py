"""The finetune pipeline's steps as plain functions: what Prefect tasks and the CLI call.

prepare → open_run → train chunks → evaluate → export. Each step takes settings and
the run name and reads/writes the ledger itself, so it can run in any process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ckptflow import faults
from ckptflow.evaluation import EVAL_LOSS, PERPLEXITY
from ckptflow.ledger import Ledger, RunRecord, RunStatus
from ckptflow.paths import DATA_CACHE_DIR, PREFECT_RESULTS_DIR, contained
from ckptflow.remote_restore import fetch_missing
from ckptflow.runs import OpenedRun, get_run, open_run
from ckptflow.settings import Settings


@dataclass(frozen=True)
class PreparedInfo:
    """What prepare_data hands on: small and picklable (the datasets stay in the on-disk cache)."""

    data_fingerprint: str
    train_rows: int
    eval_rows: int
    source: str
    model_path: str


def data_cache_dir(settings: Settings) -> Path:
    return contained(settings.home, DATA_CACHE_DIR)


def prefect_results_dir(settings: Settings) -> Path:
    """Where Prefect persists task results (the prepare_data cache)."""
    return contained(settings.home, PREFECT_RESULTS_DIR)


def load_inputs(settings: Settings):
    """(resolved model, tokenizer, prepared data); the tokenized data comes from the cache when warm."""
    from ckptflow.data import prepare_data
    from ckptflow.modeling import load_tokenizer, resolve_model

    resolved = resolve_model(settings.model.name_or_path, settings.home)
    tokenizer = load_tokenizer(resolved)
    data = prepare_data(
        settings.data,
        tokenizer=tokenizer,
        max_length=settings.model.max_length,
        seed=settings.train.seed,
        cache_dir=data_cache_dir(settings),
    )
    return resolved, tokenizer, data


def prepare(settings: Settings) -> PreparedInfo:
    resolved, _, data = load_inputs(settings)
    return PreparedInfo(data.fingerprint, data.train_rows, data.eval_rows, data.source, str(resolved.path))


def prepare_key(settings: Settings) -> str:
    """Digest of everything `prepare` reads: data bytes, tokenizer, formatting settings, model path.

    Cheap — it hashes files and loads the tokenizer but tokenizes nothing — so Prefect can use
    it as the cache key of `prepare_data`: equal keys give equal PreparedInfo. Raises like
    `prepare` for a model that cannot be resolved.
    """
    from ckptflow.data import FORMAT_VERSION, tokenizer_identity
    from ckptflow.modeling import load_tokenizer, resolve_model

    resolved = resolve_model(settings.model.name_or_path, settings.home)
    header = {
        "format": FORMAT_VERSION,
        "data": settings.data.model_dump(mode="json"),
        "max_length": settings.model.max_length,
        "seed": settings.train.seed,
        "model_path": str(resolved.path),
        "tokenizer": tokenizer_identity(load_tokenizer(resolved)),
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for spec in (settings.data.train, settings.data.eval):
        _hash_source(digest, spec)
    return digest.hexdigest()


def _hash_source(digest: Any, spec: str) -> None:
    """Feed a data spec's content into `digest`: built-in texts, a file's bytes, or every file of a directory."""
    from ckptflow.builtin import BUILTIN_PREFIX, builtin_texts

    digest.update(f"\0source:{spec}".encode())
    if not spec:
        return
    if spec.startswith(BUILTIN_PREFIX):
        digest.update(json.dumps(builtin_texts(spec)).encode())
        return
    path = Path(spec).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if not file.is_file():
            digest.update(b"\0missing")
            continue
        digest.update(f"\0{file.relative_to(path) if path.is_dir() else file.name}".encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)


def open_or_create_run(settings: Settings, prepared: PreparedInfo, run_name: str | None, new: bool) -> OpenedRun:
    """Open (or create) the run; refuses first (exit 2) a `checkpoint.remote_url` whose bucket is missing."""
    _check_remote(settings)
    ledger = Ledger(settings.ledger, home=settings.home)
    try:
        opened = open_run(
            ledger,
            settings,
            data_fingerprint=prepared.data_fingerprint,
            train_rows=prepared.train_rows,
            run_name=run_name,
            new=new,
        )
        if not opened.completed:  # if it completed since it was read, it stays completed (a duplicate submission)
            opened = replace(opened, run=ledger.reopen_run(opened.run.id))
        return opened
    finally:
        ledger.close()


def _check_remote(settings: Settings) -> None:
    """Before training: a remote whose bucket is missing or unreadable is bad input, not a failure after the first save."""
    if settings.checkpoint.remote_url:
        from ckptflow.remote_fs import check_writable_root, open_store

        check_writable_root(open_store(settings.checkpoint.remote_url))


def set_status(settings: Settings, run_name: str, status: RunStatus) -> None:
    ledger = Ledger(settings.ledger, home=settings.home)
    try:
        ledger.set_run_status(get_run(ledger, run_name).id, status)
    finally:
        ledger.close()


def evaluate_run(settings: Settings, run_name: str) -> dict[str, Any]:
    """Eval loss/perplexity of the base model and the best checkpoint; stored in runs.metrics."""
    from ckptflow.evaluation import evaluate_checkpoint, evaluate_model
    from ckptflow.modeling import load_base_model
    from ckptflow.selection import choose_checkpoint

    ledger = Ledger(settings.ledger, home=settings.home)
    try:
        run = get_run(ledger, run_name)
        resolved, tokenizer, data = load_inputs(settings)
        if data.eval is None or not settings.checkpoint.evaluates:
            return {"skipped": "no eval data or eval_strategy=no"}
        notes = fetch_missing(ledger, run.id, settings.checkpoint.remote_url)  # checkpoints only on the remote
        best, chosen_notes = choose_checkpoint(ledger, run, settings)
        notes += chosen_notes
        base = evaluate_model(load_base_model(resolved), data.eval, tokenizer, settings)
        tuned = evaluate_checkpoint(load_base_model(resolved), Path(best.path), data.eval, tokenizer, settings)
        result = {
            "base_eval_loss": base[EVAL_LOSS],
            "base_perplexity": base[PERPLEXITY],
            "best_step": best.step,
            "best_eval_loss": tuned[EVAL_LOSS],
            "best_perplexity": tuned[PERPLEXITY],
            "notes": notes,
        }
        ledger.update_run_metrics(run.id, result)
        return result
    finally:
        ledger.close()


def export_run(
    settings: Settings,
    run_name: str,
    *,
    step: int | None = None,
    out: Path | None = None,
    merge: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Export the best (or `step`) verified checkpoint; records it in the ledger.

    An explicit `out` that holds an earlier export is replaced only with `force`.
    """
    from ckptflow.export import export_checkpoint, export_target
    from ckptflow.modeling import load_base_model, load_tokenizer, resolve_model
    from ckptflow.selection import choose_checkpoint

    target = export_target(settings, run_name, out=out, force=force)
    faults.configure(settings.fault)
    ledger = Ledger(settings.ledger, home=settings.home)
    try:
        run = get_run(ledger, run_name)
        notes = fetch_missing(ledger, run.id, settings.checkpoint.remote_url, step=step)  # export from the remote alone
        ckpt, chosen_notes = choose_checkpoint(ledger, run, settings, step=step)
        notes += chosen_notes
        resolved = resolve_model(settings.model.name_or_path, settings.home)
        merged = settings.export.merge if merge is None else merge
        metrics = export_metrics(ckpt.step, ckpt.metrics, run.metrics)
        result = export_checkpoint(
            run=run,
            checkpoint=ckpt,
            out_dir=target,
            merge=merged,
            base_loader=lambda: load_base_model(resolved),
            tokenizer=load_tokenizer(resolved),
            metrics=metrics,
            notes=notes,
        )
        faults.pause("export-swapped", ckpt.step)
        record = ledger.record_export(
            run.id, checkpoint_id=ckpt.id, path=str(result.path), merged=merged, metrics=metrics
        )
        remote = _upload_export(settings, run_name, result.path) if out is None else None
        return {
            "export_id": record.id,
            "path": str(result.path),
            "step": ckpt.step,
            "merged": merged,
            "metrics": metrics,
            "max_logit_diff": result.max_logit_diff,
            "seconds": result.seconds,
            "notes": notes,
            "remote_url": remote,
        }
    finally:
        ledger.close()


def _upload_export(settings: Settings, run_name: str, path: Path) -> str | None:
    """Copy the run's export to `<remote_url>/exports/<run>/` (provenance last); its URL (masked), or None without a remote.

    Only the home's own export goes up (an `--out` directory is the user's).
    """
    if not settings.checkpoint.remote_url:
        return None
    from ckptflow.export import PROVENANCE_NAME
    from ckptflow.remote import upload_export

    return upload_export(path, settings.checkpoint.remote_url, run_name, PROVENANCE_NAME).url


def export_metrics(step: int, checkpoint_metrics: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """What an export's card and provenance report: the exported step's own metrics, the base model's,
    and the end-of-run evaluation of the best checkpoint only when that is the step exported."""
    metrics = {**checkpoint_metrics, **{k: v for k, v in evaluation.items() if k.startswith("base_")}}
    if evaluation.get("best_step") == step:
        metrics.update({k: v for k, v in evaluation.items() if k.startswith("best_")})
    return metrics


@contextmanager
def run_lease(settings: Settings, run_name: str, holder: str) -> Iterator[RunRecord]:
    """Hold the run's lease for the block (heartbeat thread): a second live `ckptflow run` on this run is refused.

    Yields the run as read once the lease is ours: what the previous holder left (it may have completed it).
    """
    from ckptflow.lease import hold_lease

    with Ledger(settings.ledger, home=settings.home) as ledger:
        run_id = get_run(ledger, run_name).id
    with hold_lease(settings.ledger, run_id, holder):
        with Ledger(settings.ledger, home=settings.home) as ledger:  # not held open while training
            run = ledger.get_run_by_id(run_id)
        yield run
