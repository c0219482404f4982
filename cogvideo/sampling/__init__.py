"""Sampling shared by every family: the batch job (`job.py`: resume, Ray actors, records,
manifest), the command (`cogvideo-sample --family NAME`, `cli.py`, which runs the family's
pipeline named in its spec), outputs (mp4 / gif / contact sheet), prompt files and the text
block, loading a converted checkpoint for sampling (`models.py`), the options' shared check
(`options.py`), and the token strategies of the token-predicting families (top-k / top-p /
temperature, CogLM's cluster strategy with its table from `cogvideo-clusters`, minimum expected
error). CogVideo's hierarchical sampler is its family's (cogvideo/models/cogvideo/pipeline.py).

    cogvideo-clusters --image-tokenizer tok.safetensors --clusters 500 --out clusters.npz
    cogvideo-sample --prompts prompts.txt --out samples/ stage1_checkpoint=... stage2_checkpoint=... \\
        text_tokenizer=... image_tokenizer=... [--ray [--address auto] workers=8 device=cuda]
"""
