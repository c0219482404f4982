import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from cogvideo.environment import apply_defaults  # noqa: E402

apply_defaults()
