"""Runs drjax's scripts as a user would: a new interpreter, this checkout's drjax, no downloads."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_script(script, *args, cwd, timeout=600) -> subprocess.CompletedProcess:
  """`python scripts/<script> args...` in `cwd`, whatever its exit status."""
  env = dict(os.environ, PYTHONPATH=str(REPO), DRJAX_NO_DOWNLOAD='1')
  return subprocess.run([sys.executable, str(REPO / 'scripts' / script), *map(str, args)],
                        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def run_ok(script, *args, cwd) -> subprocess.CompletedProcess:
  """`run_script`, asserting that the script succeeded (its output tail if not)."""
  result = run_script(script, *args, cwd=cwd)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result
