"""PrepConfig: YAML + dotted overrides, checks naming the key; shapes come from the model config."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cogvideo.configio import ConfigError, load_config
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.tokenizers.patch_fit import fit_patch_tokenizer
from data_prep.config import PrepConfig, prep_model
from data_prep.encoders import TokenEncoder
from data_prep.pipeline import MAX_INPUTS_PER_TASK, TASKS_PER_CPU, balanced, task_count
from data_prep.stages import EncodeSamples
from data_prep.synthetic import main as synth_main

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides_fill_the_config_and_bad_values_name_the_key(tmp_path):
    (tmp_path / "prep.yaml").write_text("stage1_fps: [1, 2, 4]\nshard_samples: 50\nmodel: {preset: tiny}\n")
    cfg = load_config(PrepConfig, tmp_path / "prep.yaml", ["stages=[1]", "model.frame_size=32"])
    assert (cfg.stage1_fps, cfg.shard_samples, cfg.stages, cfg.model) == (
        [1.0, 2.0, 4.0],
        50,
        [1],
        {"preset": "tiny", "frame_size": 32},
    )
    for override, key in (
        ("stages=[3]", "prep.stages"),
        ("stage2_fps=[0]", "prep.stage2_fps"),
        ("min_clip_s=100", "prep.min_clip_s"),
        ("shard_samples=0", "prep.shard_samples"),
        ("shard_size=3", "shard_size"),
        ("tokenizer_loader=nocolon", "prep.tokenizer_loader"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(PrepConfig, None, [override])


def test_sample_shape_comes_from_the_model_config():
    for preset in ("tiny", "small", "cogvideo-stage1"):
        model = get_preset(preset)
        shape = prep_model(PrepConfig(model={"preset": preset}))
        assert (shape.frame_size, shape.frame_tokens, shape.num_frames) == (
            model.frame_size,
            model.frame_tokens,
            model.num_frames,
        )
    assert prep_model(PrepConfig(model={"preset": "small", "num_frames": 9})).num_frames == 9
    with pytest.raises(ValueError, match="model.frame_tokens"):
        prep_model(PrepConfig(model={"preset": "small", "frame_tokens": 5}))
    with pytest.raises(ConfigError, match="stage-2"):
        prep_model(PrepConfig(model={"preset": "cogview2-6b"}))


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_naming_both(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8)
    fit_patch_tokenizer(frames, 16, 32, 4, preset="small").save(tmp_path / "t32.safetensors")
    cfg = PrepConfig(
        model={"preset": "tiny"}, tokenizer=str(tmp_path / "t32.safetensors")
    )  # tiny: 16 px frames
    with pytest.raises(ConfigError, match="t32.safetensors.*32px.*16px.*model.frame_size"):
        EncodeSamples(cfg, prep_model(cfg), TokenEncoder)


def test_synth_command_writes_the_videos_and_captions(tmp_path):
    synth_main([f"out={tmp_path}", "num_videos=3", "size=32", "durations=[1.0]", "holdout=[red/circle/left]"])
    assert len(list(tmp_path.glob("*.mp4"))) == 3 and (tmp_path / "captions.jsonl").is_file()
    with pytest.raises(SystemExit) as exit:
        synth_main([f"out={tmp_path}", "holdout=[red-circle]"])
    assert exit.value.code == 2


def test_tokenizer_actors_take_a_gpu_when_the_cluster_has_one_unless_configured():
    assert PrepConfig().gpus_per_actor(cluster_gpus=0) == 0.0
    assert PrepConfig().gpus_per_actor(cluster_gpus=8) == 1.0
    assert PrepConfig(tokenizer_gpus=0.25).gpus_per_actor(cluster_gpus=8) == 0.25
    assert PrepConfig(tokenizer_gpus=0).gpus_per_actor(cluster_gpus=8) == 0
    assert load_config(PrepConfig, None, ["tokenizer_gpus=0.5"]).tokenizer_gpus == 0.5


def test_the_extraction_tasks_encode_unless_the_encoder_needs_resources_of_its_own():
    """tokenizer_actors None: actors only for an encoder with a GPU or reserved CPUs; 0 never
    (and then nothing may be reserved for them); N always N."""
    assert PrepConfig().encoder_actors(PrepConfig().gpus_per_actor(cluster_gpus=0)) == 0
    assert PrepConfig().encoder_actors(PrepConfig().gpus_per_actor(cluster_gpus=8)) == 1
    assert PrepConfig(tokenizer_cpus=2).encoder_actors(0.0) == 1
    assert PrepConfig(tokenizer_actors=3).encoder_actors(0.0) == 3
    in_tasks = PrepConfig(tokenizer_actors=0)
    assert in_tasks.gpus_per_actor(cluster_gpus=8) == 0.0 and in_tasks.encoder_actors(0.0) == 0
    for bad in (["tokenizer_actors=0", "tokenizer_cpus=1"], ["tokenizer_actors=0", "tokenizer_gpus=1"]):
        with pytest.raises(ConfigError, match="tokenizer_actors: 0 encodes in the extraction tasks"):
            load_config(PrepConfig, None, bad)
    with pytest.raises(ConfigError, match="tokenizer_actors: must be >= 0"):
        load_config(PrepConfig, None, ["tokenizer_actors=-1"])


def test_blocks_get_a_like_share_of_the_bytes_however_many():
    """Inputs listed in runs of like size (copies of one video after another) come out in an
    order whose contiguous blocks (Ray's split: equal counts, the first ones one more), for any
    block count, get big and small ones alike; every input once, the order the same each time."""
    sizes = [1000, 800, 600, 400, 300, 200, 100, 50]
    rows = [{"path": f"v{i}_{copy}", "size": size} for i, size in enumerate(sizes) for copy in range(20)]
    dealt = balanced(rows)
    assert sorted(r["path"] for r in dealt) == sorted(r["path"] for r in rows)
    assert [r["path"] for r in balanced(rows)] == [r["path"] for r in dealt]
    for blocks in (2, 4, 8, 16):
        split = np.array_split(np.arange(len(rows)), blocks)
        sums = [sum(dealt[i]["size"] for i in part) for part in split]
        as_listed = [sum(rows[i]["size"] for i in part) for part in split]
        # within two of the largest inputs (the sequence's discrepancy), where as listed blocks
        # differ by many
        assert max(sums) - min(sums) <= 2 * max(sizes), (blocks, sums)
        assert max(as_listed) - min(as_listed) > 4 * max(sizes)


def test_sized_tasks_keep_every_cpu_busy_and_stay_small():
    """prep.inputs_per_task=0: TASKS_PER_CPU tasks a CPU at least, MAX_INPUTS_PER_TASK inputs a
    task at most, never more tasks than inputs; a set inputs_per_task is taken as given."""
    sized = PrepConfig()
    assert task_count(160, sized, cpus=2) == 2 * TASKS_PER_CPU  # 20 inputs a task
    assert task_count(4000, sized, cpus=2) == -(-4000 // MAX_INPUTS_PER_TASK)  # capped at 32 a task
    assert task_count(4000, sized, cpus=1024) == 4000  # a large cluster: one each
    assert task_count(3, sized, cpus=2) == 3
    assert task_count(5, sized, cpus=0.5) == TASKS_PER_CPU  # a fractional CPU counts as one
    assert task_count(160, PrepConfig(inputs_per_task=1), cpus=2) == 160
    assert task_count(160, PrepConfig(inputs_per_task=7), cpus=2) == 23
    with pytest.raises(ConfigError, match="prep.inputs_per_task"):
        load_config(PrepConfig, None, ["inputs_per_task=-1"])


def test_token_jobs_do_not_import_diffusers():
    """A job's encoder actors import data_prep.encoders whatever they encode; diffusers (~2 s of
    each actor's start) is imported only by the latent encoder that uses it."""
    code = (
        "import sys, data_prep.stages, data_prep.encoders, data_prep.pipeline; "
        "sys.exit('diffusers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
