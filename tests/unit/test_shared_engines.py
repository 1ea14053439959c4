"""Ledgers of one URL in a process share an engine (its compiled SQL) but hold connections only while open."""

from __future__ import annotations

import shutil
import threading

from ckptflow.ledger import Ledger, shared_engines

RUN = {"fingerprint": "fp", "config": {}, "base_model": "builtin:tiny-gpt2", "total_steps": 8}


def _url(tmp_path, name="ledger.db"):
    return f"sqlite:///{tmp_path / 'home' / name}"


def test_a_later_open_compiles_nothing_again(tmp_path):
    url = _url(tmp_path)
    with Ledger(url) as setup:  # creates and migrates the database
        setup.create_run("a", **RUN)
    with Ledger(url) as first:
        first.get_run("a")
        compiled = first._engine._compiled_cache
        before = set(compiled.keys())
    with Ledger(url) as again:
        assert again.get_run("a") is not None
        assert again._engine._compiled_cache is compiled
    new = [str(value) for key, value in compiled.items() if key not in before]
    # Only Alembic's read of the schema revision (its version table is a new Table object per open) compiles again.
    assert all("alembic_version" in sql for sql in new), new


def test_connections_are_closed_when_the_last_open_ledger_of_the_url_closes(tmp_path):
    url = _url(tmp_path)
    wal = tmp_path / "home" / "ledger.db-wal"
    first, second = Ledger(url), Ledger(url)
    first.create_run("a", **RUN)
    first.close()
    assert wal.exists() and second.get_run("a") is not None  # the other one is still open: its connections too
    second.close()
    assert not wal.exists()  # SQLite removes the WAL when its last connection closes
    assert second._engine.pool.checkedout() == 0


def test_closing_twice_counts_once(tmp_path):
    url = _url(tmp_path)
    first, second = Ledger(url), Ledger(url)
    first.close()
    first.close()
    assert second.get_run("missing") is None  # still usable: the double close did not end its share
    second.close()


def test_a_home_removed_between_opens_is_made_again(tmp_path):
    url = _url(tmp_path)
    with Ledger(url) as first:
        first.create_run("a", **RUN)
    shutil.rmtree(tmp_path / "home")
    with Ledger(url) as fresh:  # same URL, same engine: a new, empty database
        assert fresh.get_run("a") is None


def test_in_memory_ledgers_stay_separate_databases():
    with Ledger("sqlite://") as one, Ledger("sqlite://") as other:
        one.create_run("a", **RUN)
        assert other.get_run("a") is None


def test_threads_share_one_engine_and_each_write_lands(tmp_path):
    url = _url(tmp_path)
    with Ledger(url) as setup:
        run = setup.create_run("a", **RUN)
    errors: list[BaseException] = []

    def writer(step: int) -> None:
        try:
            for _ in range(5):
                with Ledger(url) as led:  # opens and closes race with the other threads'
                    led.begin_checkpoint(run.id, step, f"/x/checkpoint-{step}")
                    step += 100
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Ledger(url) as check:
        assert len(check.checkpoints(run.id)) == 20


def test_idle_engines_are_bounded(tmp_path):
    for i in range(shared_engines._MAX_IDLE + 5):
        Ledger(_url(tmp_path, f"l{i}.db")).close()
    idle = [e for e in shared_engines._entries.values() if e.users == 0]
    assert len(idle) <= shared_engines._MAX_IDLE


def test_a_forked_child_makes_its_own_engine(tmp_path):
    import multiprocessing

    url = _url(tmp_path)
    with Ledger(url) as parent:  # open while forking: its pool holds the parent's connection
        parent.create_run("a", **RUN)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            child_engine_is_new = pool.apply(_engine_is_not_inherited, (url, id(parent._engine)))
        assert child_engine_is_new
        assert parent.get_run("a") is not None  # the child's exit left the parent's connection alone


def _engine_is_not_inherited(url: str, parent_engine_id: int) -> bool:
    with Ledger(url) as led:
        return id(led._engine) != parent_engine_id and led.get_run("a") is not None
