"""Timing probe for benchmark processes: wraps library functions at import time, no library edits.

`install(out_dir)` (called from sitecustomize) does three things in the current process:

1. times every outermost `import` (builtins.__import__ and importlib.import_module);
2. when a target module finishes executing, replaces selected functions/methods with timing
   wrappers (spans: name, start, end, and how much of that time went to imports, ledger
   calls, manifest hashing and verification inside it);
3. at exit writes `probe-<pid>.json` into `out_dir`.

Clock: time.monotonic(), system-wide on Linux, so spans of a parent and its children line up.
Everything is stdlib-only, and the overhead is a few microseconds per wrapped call.
"""

from __future__ import annotations

import atexit
import builtins
import functools
import importlib
import importlib.abc
import json
import os
import sys
import threading
import time

_now = time.monotonic
_tls = threading.local()
STATE: dict = {
    "pid": os.getpid(),
    "argv": list(getattr(sys, "orig_argv", sys.argv)),
    "t_site": _now(),
    "spans": [],
    "calls": {},
    "cats": {},
    "steps": [],
    "events": [],
    "other_threads": {},
}
# Categories whose time is also credited to every span open in the same thread.
CATEGORIES = ("imports", "ledger", "manifest", "verify")


def _stack() -> list:
    s = getattr(_tls, "stack", None)
    if s is None:
        s = _tls.stack = []
    return s


def _depths() -> dict:
    d = getattr(_tls, "depths", None)
    if d is None:
        d = _tls.depths = {}
    return d


def _credit(cat: str, seconds: float) -> None:
    STATE["cats"][cat] = STATE["cats"].get(cat, 0.0) + seconds
    for span in _stack():
        span["c"][cat] = span["c"].get(cat, 0.0) + seconds


def _timed_category(cat: str, name: str, fn, *args, **kwargs):
    """Run fn; credit its time to `cat` unless an outer call of the same category is already timing.

    Outermost calls are also kept as events (category, name, start, end) so a reader can
    place them on the timeline.
    """
    if threading.current_thread() is not threading.main_thread():  # e.g. a heartbeat thread: off the timeline
        t0 = _now()
        try:
            return fn(*args, **kwargs)
        finally:
            other = STATE["other_threads"]
            other[cat] = other.get(cat, 0.0) + _now() - t0
    depths = _depths()
    if depths.get(cat):
        return fn(*args, **kwargs)
    depths[cat] = 1
    t0 = _now()
    try:
        return fn(*args, **kwargs)
    finally:
        depths[cat] = 0
        t1 = _now()
        _credit(cat, t1 - t0)
        STATE["events"].append([cat, name, t0, t1])


# -- 1. imports ---------------------------------------------------------------------------
def _import_wrapper(orig):
    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        return _timed_category("imports", "", orig, *args, **kwargs)

    return wrapper


# -- 2. spans -----------------------------------------------------------------------------
def _span_wrapper(orig, name, cat=None, record=True):
    """`name`: a string, or a callable(args) -> string. `cat`: also time as that category."""

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        label = name(args) if callable(name) else name
        t0 = _now()
        span = {"n": label, "t0": t0, "t1": None, "c": {}}
        keep = record and threading.current_thread() is threading.main_thread()  # one timeline per process
        if keep:
            _stack().append(span)
        try:
            if cat:
                return _timed_category(cat, label, orig, *args, **kwargs)
            return orig(*args, **kwargs)
        finally:
            t1 = _now()
            if keep:
                _stack().pop()
                span["t1"] = t1
                STATE["spans"].append(span)
            entry = STATE["calls"].setdefault(label, [0, 0.0])
            entry[0] += 1
            entry[1] += t1 - t0

    return wrapper


def _step_end_wrapper(orig):
    @functools.wraps(orig)
    def wrapper(self, args, state, control, **kwargs):
        try:
            return orig(self, args, state, control, **kwargs)
        finally:  # also when a callback raises (fault injection stops a run right there)
            STATE["steps"].append([_now(), int(state.global_step)])

    return wrapper


def _missing(owner, attr) -> None:
    """A target that is gone (a library upgrade renamed it): recorded, and run_probed then fails the benchmark."""
    where = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", repr(owner))
    STATE.setdefault("missing", []).append(f"{where}.{attr}")


def _patch(owner, attr, make):
    orig = getattr(owner, attr, None)
    if orig is None:
        _missing(owner, attr)
        return
    if not getattr(orig, "_bench_probe", False):
        wrapped = make(orig)
        wrapped._bench_probe = True
        setattr(owner, attr, wrapped)


def _spans(owner, names, prefix, cat=None):
    for attr in names:
        _patch(owner, attr, lambda f, a=attr: _span_wrapper(f, f"{prefix}{a}", cat))


def _patch_trainer(m):
    _spans(m.Trainer, ["train"], "hf.")
    _patch(m.Trainer, "_save_checkpoint", lambda f: _span_wrapper(f, "hf.save"))
    _patch(m.Trainer, "_evaluate", lambda f: _span_wrapper(f, "hf.eval"))
    _patch(m.Trainer, "_load_from_checkpoint", lambda f: _span_wrapper(f, "hf.resume_model"))
    _patch(m.Trainer, "_load_optimizer_and_scheduler", lambda f: _span_wrapper(f, "hf.resume_optim"))
    _patch(m.Trainer, "_load_rng_state", lambda f: _span_wrapper(f, "hf.resume_rng"))


def _patch_callbacks(m):
    _patch(m.CallbackHandler, "on_step_end", _step_end_wrapper)
    _patch(m.CallbackHandler, "on_save", lambda f: _span_wrapper(f, "cb.on_save"))


def _patch_classmethod(cls, attr, name):
    raw = cls.__dict__.get(attr)
    if not isinstance(raw, classmethod):
        _missing(cls, attr)
        return
    if isinstance(raw, classmethod) and not getattr(raw.__func__, "_bench_probe", False):
        wrapped = _span_wrapper(raw.__func__, name)
        wrapped._bench_probe = True
        setattr(cls, attr, classmethod(wrapped))


def _patch_auto_model(m):
    _patch_classmethod(m._BaseAutoModelClass, "from_pretrained", "hf.model_from_pretrained")


def _patch_auto_tokenizer(m):
    _patch_classmethod(m.AutoTokenizer, "from_pretrained", "hf.tokenizer_from_pretrained")


def _patch_sft(m):
    _patch(m.SFTTrainer, "__init__", lambda f: _span_wrapper(f, "trainer.init"))


def _patch_ledger(m):
    for attr, value in list(vars(m.Ledger).items()):
        if callable(value) and (not attr.startswith("_") or attr == "__init__"):
            _patch(m.Ledger, attr, lambda f, a=attr: _span_wrapper(f, f"ledger.{a}", "ledger", record=False))


def _patch_server(m):
    _patch(m.SubprocessASGIServer, "start", lambda f: _span_wrapper(f, "prefect.server_start"))
    _patch(m.SubprocessASGIServer, "stop", lambda f: _span_wrapper(f, "prefect.server_stop"))


def _patch_temporary_server(m):  # `ckptflow run` starts Prefect's temporary server itself (flows/temporary_server.py)
    _patch(m.TemporaryServer, "wait", lambda f: _span_wrapper(f, "prefect.server_start"))
    _patch(m.TemporaryServer, "stop", lambda f: _span_wrapper(f, "prefect.server_stop"))


def _patch_task(m):
    _patch(m.Task, "__call__", lambda f: _span_wrapper(f, lambda a: f"task:{a[0].name}"))


def _patch_flow(m):
    _patch(m.Flow, "__call__", lambda f: _span_wrapper(f, lambda a: f"flow:{a[0].name}"))


def _module_spans(names, prefix, cats=None):
    cats = cats or {}

    def patch(m):
        for attr in names:
            _patch(m, attr, lambda f, a=attr: _span_wrapper(f, f"{prefix}{a}", cats.get(a)))

    return patch


PATCHES = {
    "transformers.trainer": _patch_trainer,
    "transformers.trainer_callback": _patch_callbacks,
    "trl.trainer.sft_trainer": _patch_sft,
    "transformers.models.auto.auto_factory": _patch_auto_model,
    "transformers.models.auto.tokenization_auto": _patch_auto_tokenizer,
    "ckptflow.ledger.store": _patch_ledger,
    "ckptflow.integrity": _module_spans(
        ["hash_files", "write_manifest", "verify_checkpoint"], "integrity.",
        {"hash_files": "manifest", "write_manifest": "manifest", "verify_checkpoint": "verify"},
    ),
    "ckptflow.committer": lambda m: _spans(m.BackgroundCommitter, ["submit", "wait_for", "close"], "committer."),
    "ckptflow.recovery": _module_spans(["reconcile", "resume_point"], "recovery."),
    "ckptflow.retention": _module_spans(["apply_retention"], "retention."),
    "ckptflow.modeling": _module_spans(["resolve_model", "load_tokenizer", "load_base_model"], "modeling."),
    "ckptflow.data": _module_spans(["prepare_data"], "data."),
    "ckptflow.pipeline": _module_spans(
        ["prepare", "load_inputs", "open_or_create_run", "evaluate_run", "export_run", "set_status"], "pipeline."
    ),
    "ckptflow.chunks": _module_spans(["run_chunk", "begin_attempt", "train_attempt", "end_attempt"], "chunks."),
    "ckptflow.views": _module_spans(["runs_view", "checkpoints_view"], "views."),
    "prefect.server.api.server": _patch_server,
    "flows.temporary_server": _patch_temporary_server,
    "prefect.tasks": _patch_task,
    "prefect.flows": _patch_flow,
}


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds target modules with the other finders, and patches them right after they execute."""

    def find_spec(self, fullname, path, target=None):
        patch = PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        orig_exec = loader.exec_module

        def exec_module(module):
            orig_exec(module)
            try:
                patch(module)
            except Exception as exc:  # a probe must never break the program it measures
                STATE.setdefault("probe_errors", []).append(f"{fullname}: {exc!r}")

        loader.exec_module = exec_module
        return spec


# -- 3. output ----------------------------------------------------------------------------
def mark(name: str) -> None:
    """Record a named instant (scripts that import the probe may call it)."""
    STATE.setdefault("marks", {})[name] = _now()


def _write(out_dir: str) -> None:
    STATE["t_exit"] = _now()
    times = os.times()
    STATE["cpu"] = times.user + times.system
    try:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"probe-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(STATE, f)
    except Exception:
        pass


def install(out_dir: str) -> None:
    builtins.__import__ = _import_wrapper(builtins.__import__)
    importlib.import_module = _import_wrapper(importlib.import_module)
    sys.meta_path.insert(0, _PostImportHook())
    atexit.register(_write, out_dir)
