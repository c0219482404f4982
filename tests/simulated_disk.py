"""A small filesystem for the full-disk test where none can be mounted: copied as
`sitecustomize.py` onto the PYTHONPATH of the test's processes (the launcher and its ranks), it
makes the folder $SIMULATED_DISK hold $SIMULATED_DISK_BYTES and no more. `torch.save` into it
(every file of a checkpoint: DeepSpeed's rank files and the trainer's parts) writes what still
fits and then fails with ENOSPC, as a write to a full filesystem does, and `shutil.disk_usage`
there reports that capacity and what the folder holds. Outside the folder nothing changes."""

import os

DISK_VAR, BYTES_VAR = "SIMULATED_DISK", "SIMULATED_DISK_BYTES"


def used_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def install(root: str, capacity: int) -> None:
    import errno
    import io
    import shutil

    import torch

    root = os.path.realpath(root)
    real_usage, real_save = shutil.disk_usage, torch.save

    def inside(path) -> bool:
        return os.path.realpath(path).startswith(root + os.sep) or os.path.realpath(path) == root

    def disk_usage(path):
        if not inside(path):
            return real_usage(path)
        used = used_bytes(root)
        return shutil._ntuple_diskusage(capacity, used, max(capacity - used, 0))

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)) or not inside(f):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        free = max(capacity - used_bytes(root), 0)
        with open(f, "wb") as out:
            out.write(data[:free])
        if len(data) > free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    shutil.disk_usage, torch.save = disk_usage, save


if os.environ.get(DISK_VAR):
    install(os.environ[DISK_VAR], int(os.environ[BYTES_VAR]))
