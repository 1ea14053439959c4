"""fast_exit.exit_now ends a process as the interpreter would — threads joined, atexit run, output flushed — minus teardown.

Each case runs a small script in a fresh interpreter with stdout and stderr piped (block-buffered,
as under CI or `| jq`), so anything left in a buffer would be missing from what the test reads.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Everything a finalizing interpreter would still do at the end, then exit_now(CODE).
_SCRIPT = textwrap.dedent(
    """
    import atexit, ctypes, sys, tempfile, threading, time, weakref
    from pathlib import Path
    from ckptflow.fast_exit import exit_now

    out = Path(sys.argv[1])
    code = eval(sys.argv[2])

    class Finalized:  # its __del__ runs only when the interpreter tears modules down
        path = str(out / "finalized")

        def __del__(self, open=open):
            with open(self.path, "w") as fh:
                fh.write("yes")

    keep = Finalized()
    atexit.register(lambda: (out / "atexit").write_text("yes"))
    tmp = tempfile.TemporaryDirectory(dir=out)  # cleaned by a weakref.finalize at exit
    (out / "tmpdir").write_text(tmp.name)

    def late_writer():
        time.sleep(0.3)
        (out / "thread").write_text("yes")

    threading.Thread(target=late_writer).start()  # non-daemon: the interpreter waits for it
    sys.stdout.write("python-stdout-" * 2000 + "end\\n")  # larger than nothing, unflushed
    sys.stderr.write("python-stderr end\\n")
    ctypes.CDLL(None).printf(b"c-stdout end\\n")  # in C's stdio buffer (a pipe: block-buffered)
    exit_now(code)
    """
)


@pytest.mark.parametrize("code, status", [(0, 0), (1, 1), (2, 2), (None, 0), ("'a message'", 1)])
def test_exit_now_keeps_status_output_and_exit_work(tmp_path: Path, code, status):
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), str(code)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == status, proc.stderr
    assert proc.stdout.startswith("python-stdout-") and "end\n" in proc.stdout and proc.stdout.endswith("c-stdout end\n")
    assert "python-stderr end" in proc.stderr
    if code == "'a message'":
        assert proc.stderr.rstrip().endswith("a message")  # printed, as SystemExit("a message") would
    assert (tmp_path / "thread").read_text() == "yes"  # joined before the atexit handlers, as the interpreter does
    assert (tmp_path / "atexit").read_text() == "yes"
    assert not Path((tmp_path / "tmpdir").read_text()).exists()  # weakref finalizers ran
    assert not (tmp_path / "finalized").exists()  # the teardown itself was skipped


def test_the_marker_sees_a_normal_teardown(tmp_path: Path):
    """The check can fail: the same script ending with sys.exit runs the teardown (the `finalized` marker appears)."""
    script = _SCRIPT.replace("exit_now(code)", "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "finalized").read_text() == "yes"
