"""cogvideo.environment: one place for the environment defaults; a user's own value wins."""

import json
import os
import subprocess
import sys
from pathlib import Path

from cogvideo.environment import DEFAULTS, apply_defaults

REPO = Path(__file__).resolve().parents[1]


def test_defaults_fill_only_what_is_missing_and_cpu_gets_deepspeeds_cpu_accelerator():
    env = {"TOKENIZERS_PARALLELISM": "true"}
    added = apply_defaults(env, cuda=False)
    assert env["TOKENIZERS_PARALLELISM"] == "true" and "TOKENIZERS_PARALLELISM" not in added
    assert env["DS_ACCELERATOR"] == "cpu" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] == "python"
    assert set(added) == set(DEFAULTS) - {"TOKENIZERS_PARALLELISM"} | {"DS_ACCELERATOR", "PATH"}
    gpu = {}
    apply_defaults(gpu, cuda=True)  # DeepSpeed finds CUDA itself
    assert "DS_ACCELERATOR" not in gpu and gpu["RAY_USAGE_STATS_ENABLED"] == "0"
    assert apply_defaults(gpu, cuda=True) == {}


CHILD_SEES = """
import json, os, subprocess, sys
from cogvideo import environment
environment.apply_defaults(cuda=False)
child = "import json, os; print(json.dumps({k: os.environ.get(k) for k in %r}))" % (sorted(environment.DEFAULTS),)
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""


def child_environment(tmp_path, apply_defaults_source: str = CHILD_SEES) -> dict:
    """What a process started after apply_defaults() sees, in a fresh interpreter whose own
    environment holds none of the defaults (as a user's shell, unlike this test session's)."""
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS and k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", apply_defaults_source], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_environments_own_tools_come_first_on_path():
    """One `ninja` for every process (DeepSpeed rebuilds its op when it finds another)."""
    tools = os.path.dirname(sys.executable)
    env = {"PATH": os.pathsep.join(["/usr/bin", tools])}
    assert apply_defaults(env, cuda=True)["PATH"] == os.pathsep.join([tools, "/usr/bin", tools])
    assert "PATH" not in apply_defaults(env, cuda=True)  # already first: left as it is


def test_defaults_reach_the_processes_a_tool_starts(tmp_path):
    assert child_environment(tmp_path) == DEFAULTS


def test_planted_defaults_kept_to_a_copy_do_not_reach_them(tmp_path):
    """The bug this catches: defaults written into a copy of the environment (the tools' own
    process and their children would not see them)."""
    planted = CHILD_SEES.replace(
        "environment.apply_defaults(cuda=False)", "environment.apply_defaults(dict(os.environ), cuda=False)"
    )
    assert planted != CHILD_SEES
    assert child_environment(tmp_path, planted) != DEFAULTS
