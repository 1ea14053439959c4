"""Bad input that preflight catches: exit 2, no traceback, a message naming what to change, nothing changed.

Each case runs the real CLI (a subprocess) against a real home: either a fresh one that does
not exist yet (`home`) or a copy of a home with a completed, exported run `base`
(`completed_home`). `run_case` snapshots the ledger (SQL dump) and the file trees of the home
and the working directory before and after, so a refusal that wrote a ledger row, a data-cache
entry, a built-in model or Prefect results fails the test.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.badinput import Case, run_case

pytestmark = pytest.mark.slow

# Four texts: enough to split an eval row off (eval_fraction 0.1 holds out one).
FOUR_ROWS = "".join(json.dumps({"text": f"row {i} of a small dataset"}) + "\n" for i in range(4))
ONE_ROW = json.dumps({"text": "the only row"}) + "\n"
NOT_SQLITE = b"this is not a SQLite database, just some bytes\n"
# A model directory whose config.json is broken in different ways (the tokenizer never matters: config fails first).
BROKEN_CONFIGS = {
    "truncated-json": '{"model_type": "gpt2", "n_layer": 2',
    "json-list": "[1, 2, 3]",
    "no-model-type": '{"hidden_size": 64}',
    "unknown-model-type": '{"model_type": "no-such-architecture"}',
    "not-utf8": b"\xff\xfe\x00garbage",
}
ABSURD_BATCH = str(10**11)  # torch's BatchSampler alone would allocate 8 bytes per slot: ~1.5 TiB
# A valid config of a model far too big for this machine's RAM (preflight reads only config.json).
BIG_CONFIG = json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 4096, "n_layer": 48, "n_head": 32, "n_positions": 4096})

# -- on a home that does not exist yet: nothing may be created ---------------------------------
FRESH_CASES = [
    # settings that validate but cannot run
    Case("epochs-inf", ("run", "-n", "r"), ("CKPTFLOW_TRAIN__EPOCHS", "finite"), env={"CKPTFLOW_TRAIN__EPOCHS": "inf"}),
    Case("epochs-minus-inf", ("run", "-n", "r"), ("CKPTFLOW_TRAIN__EPOCHS",), env={"CKPTFLOW_TRAIN__EPOCHS": "-inf"}),
    Case("epochs-nan", ("run", "-n", "r"), ("CKPTFLOW_TRAIN__EPOCHS",), env={"CKPTFLOW_TRAIN__EPOCHS": "nan"}),
    Case("lr-inf", ("run",), ("CKPTFLOW_TRAIN__LEARNING_RATE", "finite"), env={"CKPTFLOW_TRAIN__LEARNING_RATE": "inf"}),
    Case("retry-delay-inf", ("run",), ("CKPTFLOW_TRAIN__RETRY_DELAY_SECONDS",), env={"CKPTFLOW_TRAIN__RETRY_DELAY_SECONDS": "inf"}),
    Case("margin-inf", ("run",), ("CKPTFLOW_EXPORT__PROMOTION_MARGIN",), env={"CKPTFLOW_EXPORT__PROMOTION_MARGIN": "inf"}),
    Case("plan-epochs-inf", ("plan",), ("CKPTFLOW_TRAIN__EPOCHS",), env={"CKPTFLOW_TRAIN__EPOCHS": "inf"}),
    Case("plan-epochs-inf-toml", ("plan", "--config", "c.toml"), ("CKPTFLOW_TRAIN__EPOCHS",), files={"c.toml": "[train]\nepochs = inf\n"}),
    Case("max-steps-huge-plan", ("plan",), ("CKPTFLOW_TRAIN__MAX_STEPS", "10,000,000"), env={"CKPTFLOW_TRAIN__MAX_STEPS": "2000000000"}),
    Case("max-steps-huge-run", ("run",), ("CKPTFLOW_TRAIN__MAX_STEPS",), env={"CKPTFLOW_TRAIN__MAX_STEPS": "99999999999999"}),
    Case("epochs-huge", ("run",), ("CKPTFLOW_TRAIN__EPOCHS", "optimizer steps"), env={"CKPTFLOW_TRAIN__EPOCHS": "1e12"}),
    Case("chunk-steps-tiny", ("run",), ("CKPTFLOW_TRAIN__CHUNK_STEPS",), env={"CKPTFLOW_TRAIN__CHUNK_STEPS": "1", "CKPTFLOW_TRAIN__MAX_STEPS": "20000"}),
    Case("builtin-unknown", ("run",), ("builtin:nope", "CKPTFLOW_MODEL__NAME_OR_PATH"), env={"CKPTFLOW_MODEL__NAME_OR_PATH": "builtin:nope"}),
    # the ledger URL
    Case("ledger-garbage", ("run",), ("CKPTFLOW_LEDGER_URL", "not a SQLAlchemy URL"), env={"CKPTFLOW_LEDGER_URL": "garbage"}),
    Case("ledger-garbage-runs", ("runs",), ("CKPTFLOW_LEDGER_URL",), env={"CKPTFLOW_LEDGER_URL": "::not a url::"}),
    Case("ledger-garbage-verify", ("verify", "x"), ("CKPTFLOW_LEDGER_URL",), env={"CKPTFLOW_LEDGER_URL": "garbage"}),
    Case("ledger-unknown-dialect", ("run",), ("CKPTFLOW_LEDGER_URL", "nosuchdb"), env={"CKPTFLOW_LEDGER_URL": "nosuchdb://x/y"}),
    Case("ledger-pg-no-driver", ("run",), ("psycopg2", "ckptflow[postgres]", "CKPTFLOW_LEDGER_URL"), env={"CKPTFLOW_LEDGER_URL": "postgresql+psycopg2://u@localhost/db"}),
    Case("ledger-pg-no-driver-runs", ("runs",), ("psycopg2", "CKPTFLOW_LEDGER_URL"), env={"CKPTFLOW_LEDGER_URL": "postgresql+psycopg2://u@localhost/db"}),
    Case("ledger-mysql-no-driver", ("checkpoints", "x"), ("CKPTFLOW_LEDGER_URL",), env={"CKPTFLOW_LEDGER_URL": "mysql+mysqldb://u@localhost/db"}),
    Case("ledger-pg-unreachable", ("run",), ("cannot reach the ledger", "CKPTFLOW_LEDGER_URL"), env={"CKPTFLOW_LEDGER_URL": "postgresql+psycopg://u:secret@127.0.0.1:1/db"}),
    Case("ledger-in-a-file", ("run",), ("CKPTFLOW_LEDGER_URL", "afile"), env={"CKPTFLOW_LEDGER_URL": "sqlite:///afile/ledger.db"}, files={"afile": "x"}),
    Case("ledger-not-sqlite", ("run",), ("not a SQLite database",), files={"home/ledger.db": NOT_SQLITE}),
    Case("ledger-not-sqlite-runs", ("runs",), ("not a SQLite database",), files={"home/ledger.db": NOT_SQLITE}),
    Case("ledger-not-sqlite-verify", ("verify", "base"), ("not a SQLite database",), files={"home/ledger.db": NOT_SQLITE}),
    Case("ledger-not-sqlite-prune", ("prune", "base", "--dry-run"), ("not a SQLite database",), files={"home/ledger.db": NOT_SQLITE}),
    Case("ledger-is-a-directory", ("run",), ("is a directory",), files={"home/ledger.db/x": "x"}),
    # the home
    Case("home-is-a-file-run", ("run",), ("CKPTFLOW_HOME", "is a file"), files={"home": "not a directory"}),
    Case("home-is-a-file-runs", ("runs",), ("CKPTFLOW_HOME", "is a file"), files={"home": "not a directory"}),
    Case("home-is-a-file-verify", ("verify", "base"), ("CKPTFLOW_HOME", "is a file"), files={"home": "x"}),
    Case("home-is-a-file-prune", ("prune", "base"), ("CKPTFLOW_HOME", "is a file"), files={"home": "x"}),
    Case("home-is-a-file-export", ("export", "base"), ("CKPTFLOW_HOME", "is a file"), files={"home": "x"}),
    # data: too few rows for the split, or none at all
    Case("one-row", ("run",), ("1 row", "CKPTFLOW_DATA__TRAIN", "CKPTFLOW_DATA__EVAL"), env={"CKPTFLOW_DATA__TRAIN": "one.jsonl"}, files={"one.jsonl": ONE_ROW}),
    Case("one-row-csv", ("run",), ("1 row", "CKPTFLOW_DATA__TRAIN"), env={"CKPTFLOW_DATA__TRAIN": "one.csv"}, files={"one.csv": "text\nonly one\n"}),
    Case("empty-jsonl", ("run",), ("no rows", "CKPTFLOW_DATA__TRAIN"), env={"CKPTFLOW_DATA__TRAIN": "empty.jsonl"}, files={"empty.jsonl": ""}),
    Case("blank-lines-jsonl", ("run",), ("no rows", "CKPTFLOW_DATA__TRAIN"), env={"CKPTFLOW_DATA__TRAIN": "blank.jsonl"}, files={"blank.jsonl": "\n\n  \n"}),
    Case("header-only-csv", ("run",), ("no rows", "CKPTFLOW_DATA__TRAIN"), env={"CKPTFLOW_DATA__TRAIN": "h.csv"}, files={"h.csv": "text\n"}),
    Case("empty-eval", ("run",), ("no rows", "CKPTFLOW_DATA__EVAL"), env={"CKPTFLOW_DATA__TRAIN": "t.jsonl", "CKPTFLOW_DATA__EVAL": "e.jsonl"}, files={"t.jsonl": FOUR_ROWS, "e.jsonl": ""}),
    Case("eval-fraction-0", ("run",), ("eval_fraction=0", "CKPTFLOW_DATA__EVAL_FRACTION"), env={"CKPTFLOW_DATA__TRAIN": "t.jsonl", "CKPTFLOW_DATA__EVAL_FRACTION": "0"}, files={"t.jsonl": FOUR_ROWS}),
    # the model's config and LoRA targets
    *[
        Case(f"config-{name}", ("run",), ("config.json", "CKPTFLOW_MODEL__NAME_OR_PATH"), env={"CKPTFLOW_MODEL__NAME_OR_PATH": "./m"}, files={"m/config.json": text})
        for name, text in BROKEN_CONFIGS.items()
    ],
    Case("lora-targets-nothing", ("run",), ("CKPTFLOW_MODEL__LORA_TARGET_MODULES", "c_attn", "c_fc"), env={"CKPTFLOW_MODEL__LORA_TARGET_MODULES": '["q_proj", "v_proj"]'}),
    Case("lora-targets-typo", ("run",), ("CKPTFLOW_MODEL__LORA_TARGET_MODULES", "c_attn"), env={"CKPTFLOW_MODEL__LORA_TARGET_MODULES": '["c_atn"]'}),
    # a step that cannot fit in RAM: a 48-layer, 4096-wide GPT-2 config at full length (weights alone ~38 GiB)
    Case("step-exceeds-ram", ("run",), ("CKPTFLOW_TRAIN__BATCH_SIZE", "GiB", "available", "CKPTFLOW_MODEL__MAX_LENGTH"), env={"CKPTFLOW_MODEL__NAME_OR_PATH": "./big", "CKPTFLOW_MODEL__MAX_LENGTH": "4096", "CKPTFLOW_TRAIN__BATCH_SIZE": "4"}, files={"big/config.json": BIG_CONFIG}),
    Case("step-exceeds-ram-toml", ("run", "-c", "c.toml"), ("CKPTFLOW_TRAIN__BATCH_SIZE", "GiB"), files={"big/config.json": BIG_CONFIG, "c.toml": '[model]\nname_or_path = "big"\nmax_length = 4096\n[train]\nbatch_size = 64\n'}),
    Case("batch-over-limit", ("run",), ("CKPTFLOW_TRAIN__BATCH_SIZE",), env={"CKPTFLOW_TRAIN__BATCH_SIZE": ABSURD_BATCH}),
    # plan --at: a step of the run (1..4 with the defaults)
    Case("plan-at-minus-1", ("plan", "--at", "-1"), ("--at", "between 1 and 4")),
    Case("plan-at-0", ("plan", "--at", "0"), ("--at", "between 1 and 4")),
    Case("plan-at-beyond", ("plan", "--at", "5"), ("--at", "between 1 and 4")),
    Case("plan-at-far-beyond-json", ("plan", "--at", "99999", "--json"), ("--at",)),
    # no runs yet: every command that names a run says so, and creates nothing
    Case("no-runs-checkpoints", ("checkpoints", "x"), ("no run named 'x'", "no runs yet")),
    Case("no-runs-verify", ("verify", "x"), ("no run named 'x'",)),
    Case("no-runs-prune-dry", ("prune", "x", "--dry-run"), ("no run named 'x'",)),
    Case("no-runs-prune", ("prune", "x"), ("no run named 'x'",)),
    Case("no-runs-export", ("export", "x"), ("no runs yet",)),
]


@pytest.mark.parametrize("case", FRESH_CASES, ids=[c.id for c in FRESH_CASES])
def test_refused_on_a_fresh_home_creating_nothing(case, home, tmp_path):
    run_case(case, home=home, cwd=tmp_path)
    if not any(name.startswith("home") for name in case.files):
        assert not home.exists(), "a refusal created the home"


# -- on a home with a completed run `base`: nothing recorded may change -----------------------
COMPLETED_CASES = [
    Case("unknown-run-checkpoints", ("checkpoints", "nope"), ("nope", "base")),
    Case("unknown-run-checkpoints-all-json", ("checkpoints", "nope", "--all", "--json"), ("nope",)),
    Case("unknown-run-verify", ("verify", "nope"), ("nope", "base")),
    Case("unknown-run-prune", ("prune", "nope"), ("nope",)),
    Case("unknown-run-prune-dry", ("prune", "nope", "--dry-run"), ("nope",)),
    Case("unknown-run-export", ("export", "nope"), ("nope",)),
    Case("resume-changed-settings", ("run", "-n", "base"), ("base", "CKPTFLOW_TRAIN__LEARNING_RATE", "--new"), env={"CKPTFLOW_TRAIN__LEARNING_RATE": "0.001"}),
    Case("completed-epochs-inf", ("run", "-n", "base"), ("CKPTFLOW_TRAIN__EPOCHS",), env={"CKPTFLOW_TRAIN__EPOCHS": "inf"}),
    Case("completed-one-row", ("run", "-n", "new"), ("1 row",), env={"CKPTFLOW_DATA__TRAIN": "one.jsonl"}, files={"one.jsonl": ONE_ROW}),
    Case("completed-step-exceeds-ram", ("run", "-n", "new"), ("CKPTFLOW_TRAIN__BATCH_SIZE", "GiB"), env={"CKPTFLOW_MODEL__NAME_OR_PATH": "./big", "CKPTFLOW_MODEL__MAX_LENGTH": "4096"}, files={"big/config.json": BIG_CONFIG}),
    Case("completed-plan-at-0", ("plan", "--at", "0"), ("--at",)),
]


@pytest.mark.parametrize("case", COMPLETED_CASES, ids=[c.id for c in COMPLETED_CASES])
def test_refused_on_a_completed_home_changing_nothing(case, completed_home, tmp_path):
    run_case(case, home=completed_home, cwd=tmp_path)


def test_export_of_a_missing_step_changes_nothing(completed_home, tmp_path):
    run_case(Case("export-step-missing", ("export", "base", "--step", "3"), ("step 3",)), home=completed_home, cwd=tmp_path)


# -- a ledger whose schema this version cannot use ---------------------------------------------
SCHEMA_COMMANDS = [("run", "-n", "base"), ("run", "-n", "other"), ("runs",), ("checkpoints", "base"), ("verify", "base"), ("prune", "base", "--dry-run"), ("prune", "base"), ("export", "base")]
REVISIONS = {"9999": "newer schema", "abc123def": "does not know"}


@pytest.mark.parametrize("revision", list(REVISIONS), ids=["newer", "unknown"])
@pytest.mark.parametrize("args", SCHEMA_COMMANDS, ids=[" ".join(a) for a in SCHEMA_COMMANDS])
def test_a_schema_this_version_does_not_know_is_refused(args, revision, completed_home, tmp_path):
    con = sqlite3.connect(completed_home / "ledger.db")
    with con:
        con.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    con.close()
    case = Case(f"schema-{revision}", args, (REVISIONS[revision], repr(revision), "CKPTFLOW_LEDGER_URL"))
    run_case(case, home=completed_home, cwd=tmp_path)


def test_a_sqlite_file_that_is_not_a_ledger_is_refused(home, tmp_path):
    home.mkdir()
    con = sqlite3.connect(home / "ledger.db")
    with con:
        con.execute("CREATE TABLE songs (title TEXT)")
    con.close()
    for args in (("run",), ("runs",), ("verify", "base")):
        run_case(Case("not-a-ledger", args, ("not a ckptflow ledger", "songs")), home=home, cwd=tmp_path)
