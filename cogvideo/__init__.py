"""CogVideo-style text-to-video transformers: config presets, model, tokenizers, sampling,
checkpoint formats."""

from cogvideo.config import ModelConfig, get_preset
from cogvideo.vocab import VocabLayout

__all__ = ["ModelConfig", "VocabLayout", "get_preset"]
