"""Let icetk's modules import where torchvision cannot be imported.

icetk imports ``torchvision.transforms`` at module level for its own PIL/resize pipeline;
cogvideo uses only icetk's VQ-VAE classes, which never touch torchvision. When the real
torchvision is importable nothing is replaced. Otherwise stand-in modules exist in
``sys.modules`` only while the ``with`` block runs, and every stand-in raises when called.
"""

from __future__ import annotations

import contextlib
import sys
import types

STANDIN_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__name__} is a stand-in: icetk's image pipeline needs the real "
            "torchvision; cogvideo only uses icetk's VQ-VAE"
        )


def _standins() -> dict[str, types.ModuleType]:
    root = types.ModuleType("torchvision", "cogvideo stand-in (torchvision not importable)")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    for name in ("Compose", "Normalize", "Resize", "CenterCrop"):
        setattr(transforms, name, type(name, (_Unavailable,), {}))
    functional.pil_to_tensor = type("pil_to_tensor", (_Unavailable,), {})
    root.transforms, transforms.functional = transforms, functional
    return dict(zip(STANDIN_MODULES, (root, transforms, functional)))


@contextlib.contextmanager
def torchvision_importable():
    """Within the block, ``import torchvision.transforms`` works (stand-in if need be)."""
    try:
        import torchvision.transforms  # noqa: F401

        real = True
    except Exception:  # missing, or an install that fails to load its compiled ops
        real = False
    if real:
        yield
        return
    saved = {name: sys.modules.get(name) for name in STANDIN_MODULES}
    sys.modules.update(_standins())
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
