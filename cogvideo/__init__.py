"""Text-to-video model families on one training stack: the families (`cogvideo.models`, one
package each), and what they share at this root: the family registry and TP plan, parallel
state, precision, config I/O, vocabulary, text format, shard schema, tokenizers, sampling job,
checkpoint tools, evaluation."""
