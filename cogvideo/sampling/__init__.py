"""Hierarchical sampling with a KV cache: frame 0 (temporal channel off, or a given image) ->
stage-1 keyframes with classifier-free guidance -> stage-2 interpolation levels, all windows
of a level in one batch. Strategies: top-k/top-p/temperature and CogLM's cluster strategy
(table from `cogvideo-clusters`). Batch job and outputs: `cogvideo-sample` (cli.py).

    cogvideo-clusters --image-tokenizer tok.safetensors --clusters 500 --out clusters.npz
    cogvideo-sample --prompts prompts.txt --out samples/ stage1_checkpoint=... stage2_checkpoint=... \\
        text_tokenizer=... image_tokenizer=... [--ray [--address auto] workers=8 device=cuda]
"""
