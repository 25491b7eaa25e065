"""What the local backend says when a worker process dies: the signal or exit code, and the usual cause
of a worker that fails before it runs anything (a script calling mlk without a ``__main__`` guard)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from mlk_plugins.backends.local import DIED, death_message

GUARD = 'if __name__ == "__main__":'


def test_death_message_names_the_signal_or_exit_code() -> None:
    killed = death_message(-signal.SIGKILL, 3, "forkserver")
    assert killed.startswith(DIED) and "SIGKILL" in killed and "out-of-memory" in killed
    assert death_message(-signal.SIGSEGV, 0, "forkserver") == f"{DIED}: ended by SIGSEGV"
    assert death_message(3, 2, "forkserver") == f"{DIED}: exit code 3"  # it had run trials: no guess
    assert death_message(1, 0, "fork") == f"{DIED}: exit code 1"  # fork does not re-import the script
    assert death_message(None, 0, "spawn") == DIED
    first = death_message(1, 0, "spawn")
    assert "before it ran any trial" in first and GUARD in first


def test_a_script_without_a_main_guard_is_told_why(tmp_path: Path) -> None:
    script = tmp_path / "search.py"
    script.write_text("from mlk.runner import execute\nfrom mlk.spec import load_spec\n\n"
                      "execute(load_spec(['+spec=digits_random', 'searcher.max_trials=2', 'compile=[]', "
                      "'deploy=[]']), quiet=True)\n")
    env = {**os.environ, "MLK_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "exited with code 1 before it ran any trial" in done.stderr and GUARD in done.stderr
