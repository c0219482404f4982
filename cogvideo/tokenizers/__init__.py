"""Text and image tokenizers (see cogvideo.vocab for how their ids share one vocabulary)."""

from cogvideo.tokenizers.image import ImageTokenizer
from cogvideo.tokenizers.loading import load_image_tokenizer
from cogvideo.tokenizers.text import TextTokenizer, train_text_tokenizer

__all__ = ["ImageTokenizer", "TextTokenizer", "load_image_tokenizer", "train_text_tokenizer"]
