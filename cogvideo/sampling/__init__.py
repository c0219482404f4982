"""Hierarchical sampling (frame 0 -> stage-1 keyframes -> stage-2 interpolation) with a KV
cache, sampling strategies, outputs and the batch job (`cogvideo-sample`)."""
