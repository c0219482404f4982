"""cogvideo.environment: one place for the environment defaults; a user's own value wins."""

from cogvideo.environment import DEFAULTS, apply_defaults


def test_defaults_fill_only_what_is_missing_and_cpu_gets_deepspeeds_cpu_accelerator():
    env = {"TOKENIZERS_PARALLELISM": "true"}
    added = apply_defaults(env, cuda=False)
    assert env["TOKENIZERS_PARALLELISM"] == "true" and "TOKENIZERS_PARALLELISM" not in added
    assert env["DS_ACCELERATOR"] == "cpu" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] == "python"
    assert set(added) == set(DEFAULTS) - {"TOKENIZERS_PARALLELISM"} | {"DS_ACCELERATOR"}
    gpu = {}
    apply_defaults(gpu, cuda=True)  # DeepSpeed finds CUDA itself
    assert "DS_ACCELERATOR" not in gpu and gpu["RAY_USAGE_STATS_ENABLED"] == "0"
    assert apply_defaults(gpu, cuda=True) == {}


def test_the_test_session_runs_with_the_defaults():
    import os

    assert all(key in os.environ for key in DEFAULTS)
