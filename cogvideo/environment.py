"""Environment defaults of this project's processes, in one place.

Each is a default (a value the user set wins) and is read by a library once, when it is imported
or started, so :func:`apply_defaults` runs before that: in `tests/conftest.py`, at the start of
the demo driver (whose sub-tools inherit the result) and before Ray starts (`cogvideo.raystart`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import MutableMapping

DEFAULTS = {
    # icetk's and tensorboardX's generated *_pb2 modules predate protobuf 4's C++/upb backends
    "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python",
    # HF tokenizers' thread pool does not survive a fork (Ray workers, loader workers)
    "TOKENIZERS_PARALLELISM": "false",
    # no usage report (or prompt about it) from Ray
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_defaults(
    environ: MutableMapping[str, str] = os.environ, cuda: bool | None = None
) -> dict[str, str]:
    """Set the defaults missing from `environ`, DS_ACCELERATOR=cpu where there is no CUDA device
    (DeepSpeed would otherwise look for one) and the interpreter's own bin folder first on PATH;
    returns what it set."""
    wanted = dict(DEFAULTS)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        wanted["DS_ACCELERATOR"] = "cpu"
    added = {key: value for key, value in wanted.items() if key not in environ}
    tools = os.path.dirname(sys.executable)
    path = environ.get("PATH", "")
    if path.split(os.pathsep)[0] != tools:
        # every process runs this environment's tools: DeepSpeed rebuilds its CPU communication op
        # whenever a process finds another `ninja` than the last build's (the system's vs the venv's)
        added["PATH"] = tools + (os.pathsep + path if path else "")
    environ.update(added)
    return added


# Notices of libraries about themselves, not about the run, that every training rank printed:
# megatron-core's fallbacks for the optional Transformer Engine and Apex (this project uses neither),
# and torch's deprecation of the collective DeepSpeed's ZeRO calls. Matched exactly.
LIBRARY_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to "),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. "),
)
# megatron-core's FSDP module announces at import which backend it would use; this project does not use it
QUIET_LOGGERS = ("megatron.core.distributed.fsdp",)


def quiet_library_notices() -> None:
    """Filter exactly LIBRARY_WARNINGS and the INFO lines of QUIET_LOGGERS in this process: what is
    left on the console is about the run."""
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
