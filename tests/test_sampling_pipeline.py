"""End to end through `cogvideo-sample`: real checkpoints, text and image tokenizers made here,
outputs on disk, determinism, a user-given first frame, and TP=2 (gloo) == TP=1."""

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from test_sdpa import recorded_dtypes

from cogvideo import parallel, precision
from cogvideo.checkpoint import load_model_config, save_model_checkpoint
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.decode import PROBE_MAX_LAYERS, PROBE_TOKENS, DecodeProbe
from cogvideo.models.cogvideo.options import SampleOptions
from cogvideo.models.cogvideo.pipeline import VideoPipeline
from cogvideo.models.cogvideo.stage_model import StageModel
from cogvideo.precision import ProbeFigures
from cogvideo.sampling import cli
from cogvideo.sampling.clusters import main as clusters_main
from cogvideo.sampling.prompts import Prompt
from cogvideo.tokenizers.loading import load_image_tokenizer
from cogvideo.tokenizers.patch_vq import PatchVQTokenizer
from cogvideo.tokenizers.text import train_text_tokenizer
from pretrain.launch import free_port

CAPTIONS = ["a cat plays with a ball 视频", "a dog runs on the beach 高清摄影", "rain falls on a lake"] * 4
GREEDY = [
    f"{stage}_strategy.{key}"
    for stage in ("frame0", "stage1", "stage2")
    for key in ("kind=topk", "temperature=0")
]


def _config(preset):  # tiny, with room for a real tokenizer's prompt
    return (
        get_preset(preset)
        .replace(text_length=32, image_position_offset=32, max_position_embeddings=48, init_std=0.3)
        .validate(2)
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    paths = {
        "text_tokenizer": train_text_tokenizer(
            CAPTIONS, root / "text", vocab_size=90, byte_fallback=False, preset="tiny"
        )
    }
    for preset, seed in (("tiny", 0), ("tiny-stage2", 1)):
        cfg = _config(preset)
        torch.manual_seed(seed)
        name = "stage1_checkpoint" if preset == "tiny" else "stage2_checkpoint"
        paths[name] = save_model_checkpoint(root / preset, build_model(cfg).state_dict(), cfg)
    codebook = torch.rand(64, 4 * 4 * 3, generator=torch.Generator().manual_seed(2)) * 255
    paths["image_tokenizer"] = root / "image.safetensors"
    PatchVQTokenizer(codebook, frame_size=16, tokens_side=4, preset="tiny").save(paths["image_tokenizer"])
    paths["cluster_table"] = root / "clusters.npz"  # the release's cluster strategy is the default
    clusters_main(
        [
            "--image-tokenizer",
            str(paths["image_tokenizer"]),
            "--clusters",
            "8",
            "--out",
            str(paths["cluster_table"]),
        ]
    )
    return {k: str(v) for k, v in paths.items()}


def _args(assets, prompts, out, *extra):
    options = [f"{k}={v}" for k, v in assets.items()]
    # fp32: these tests compare codes across batch sizes and TP degrees, exact only in fp32
    return [
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        *options,
        "interpolation_levels=1",
        "batch_size=2",
        "dtype=fp32",
        *extra,
    ]


MATMUL_SAYS_BF16 = ProbeFigures("cpu", {"fp32": 100.0, "bf16": 220.0}, (4, 32, 128), 1)


def timed_steps(monkeypatch, figures: ProbeFigures, steps: dict[str, float]) -> list[str]:
    """The precision probe answers with `figures` and the decoding's step times with `steps`;
    the names of the steps it was asked to time, in order."""
    timed = []

    def time_steps(step, names, device):
        timed.extend(names)
        return {name: steps[name] for name in names}

    monkeypatch.setattr(precision, "measure", lambda device, shape: figures)
    monkeypatch.setattr(precision, "_measured", {})
    monkeypatch.setattr(precision, "time_steps", time_steps)
    return timed


@pytest.mark.parametrize(
    "figures, steps, expected",
    [
        (MATMUL_SAYS_BF16, {"fp32": 1.0, "bf16": 0.5}, torch.bfloat16),
        # the dev CPU (AVX-512 BF16): bf16 products 1.6x faster, its decoding slower
        (MATMUL_SAYS_BF16, {"fp32": 1.0, "bf16": 1.8}, torch.float32),
        (
            ProbeFigures("cpu", {"fp32": 20.0, "bf16": 0.3}, (4, 32, 128), 1),
            {"fp32": 1.0, "bf16": 60.0},
            torch.float32,
        ),
    ],
)
def test_auto_dtype_loads_the_models_in_the_decoding_probes_choice(
    assets, monkeypatch, figures, steps, expected
):
    """`auto` follows the decoding's own step times, not the matmul's, and every stage loads in it."""
    timed = timed_steps(monkeypatch, figures, steps)
    options = SampleOptions(
        **{k: v for k, v in assets.items()}, dtype="auto", attention_precision="same", interpolation_levels=1
    )
    pipeline = VideoPipeline.load(options)
    assert timed == ["fp32", "bf16"]
    assert pipeline.precision.requested == "auto" and pipeline.precision.dtype == expected
    assert pipeline.precision.figures.step_seconds == steps
    for stage in (pipeline.sampler.stage1, pipeline.sampler.stage2):
        assert {p.dtype for p in stage.model.parameters()} == {expected}


@pytest.mark.parametrize(
    "upcast_seconds, attention", [(0.4, torch.float32), (0.6, torch.bfloat16)], ids=["faster", "slower"]
)
def test_auto_attention_times_the_decoding_both_ways_and_samples_in_its_choice(
    assets, monkeypatch, upcast_seconds, attention
):
    """On a CPU `attention_precision: auto` times the bf16 decoding with attention in fp32 too and
    keeps the faster; the pipeline's sampling (every stage's attention) then computes in it."""
    steps = {"fp32": 1.0, "bf16": 0.5, "bf16_attention_fp32": upcast_seconds}
    timed = timed_steps(monkeypatch, MATMUL_SAYS_BF16, steps)
    options = SampleOptions(**{k: v for k, v in assets.items()}, dtype="auto", interpolation_levels=1)
    pipeline = VideoPipeline.load(options)
    assert timed == ["fp32", "bf16", "bf16_attention_fp32"]
    assert pipeline.precision.dtype == torch.bfloat16
    assert pipeline.precision.fp32_attention == (attention == torch.float32)
    calls = recorded_dtypes(monkeypatch)
    pipeline.sample([Prompt("cat", "a cat plays with a ball")])
    assert calls and set(calls) == {attention}


def test_the_decoding_probe_runs_the_stage_models_cached_decoding(assets, monkeypatch):
    """The probe's step is the sampler's work in the named precision: the text, a given frame,
    then single-token steps of the next frame through the KV cache, on the stage-1 model's
    layout cut to at most PROBE_MAX_LAYERS layers."""
    cfg = load_model_config(assets["stage1_checkpoint"]).replace(num_layers=PROBE_MAX_LAYERS + 2)
    calls = []
    real_step = StageModel.step

    def step(self, tokens, frame_index, start, cache, text_bias):
        calls.append((next(self.model.parameters()).dtype, frame_index, start, tokens.shape))
        return real_step(self, tokens, frame_index, start, cache, text_bias)

    monkeypatch.setattr(StageModel, "step", step)
    probe = DecodeProbe(cfg, "cpu", rows=4)
    probe("bf16")
    probe("fp32")
    steps = min(PROBE_TOKENS, cfg.tokens_per_frame)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        stage = probe.stages[name]
        assert stage.cfg.num_layers == PROBE_MAX_LAYERS and stage.cfg.text_length == cfg.text_length
        assert {p.dtype for p in stage.model.parameters()} == {dtype}
        mine = [c for c in calls if c[0] == dtype]
        assert [(f, start, tuple(shape)) for _, f, start, shape in mine] == [
            (1, p, (4, 1)) for p in range(steps)
        ]
    attention = recorded_dtypes(monkeypatch)
    probe("bf16_attention_fp32")  # the bf16 model again, its attention computed in fp32
    assert attention and set(attention) == {torch.float32}
    assert set(probe.stages) == {"bf16", "fp32"} and calls[-1][0] == torch.bfloat16


def test_bf16_sampling_end_to_end(assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat plays with a ball\na dog runs\n")
    assert cli.main(_args(assets, prompts, tmp_path / "o", "dtype=bf16")) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["ok"] == 2
    for entry in manifest["entries"]:
        codes = np.load(tmp_path / "o" / entry["key"] / "codes.npy")
        assert codes.shape == (9, 4, 4) and codes.min() >= 0 and codes.max() < 64  # valid image codes


def test_sample_command_end_to_end(assets, tmp_path):
    image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "first.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(p, ensure_ascii=False)
            for p in [
                {"prompt": "a cat plays with a ball", "key": "cat"},
                {"prompt": "a dog runs", "key": "dog", "first_frame": str(tmp_path / "first.png")},
                {"prompt": "a cat plays with a ball a dog runs on the beach rain falls", "key": "long"},
            ]
        )
    )
    assert (
        cli.main(_args(assets, prompts, tmp_path / "a")) == 1
    )  # one prompt failed (exit 1), the others sampled
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (manifest["ok"], manifest["failed"]) == (2, 1)
    assert "text budget" in manifest["entries"][2]["error"]
    tokenizer = load_image_tokenizer(assets["image_tokenizer"])
    cat = np.load(tmp_path / "a" / "cat" / "codes.npy")
    dog = np.load(tmp_path / "a" / "dog" / "codes.npy")
    assert cat.shape == dog.shape == (9, 4, 4)
    assert np.array_equal(dog[0], tokenizer.encode(image[None])[0])  # the user's first frame
    assert Image.open(tmp_path / "a" / "cat" / "video.gif").n_frames == 9
    record = json.loads((tmp_path / "a" / "options.json").read_text())
    assert record["stage1_checkpoint"] == assets["stage1_checkpoint"] and record["stage1_guidance"] == 3.0
    # same prompts + seed -> same video, in another run and batched differently
    (tmp_path / "cat.txt").write_text("a cat plays with a ball\n")
    assert cli.main(_args(assets, tmp_path / "cat.txt", tmp_path / "b", "batch_size=1")) == 0
    [entry] = [d for d in (tmp_path / "b").iterdir() if d.is_dir()]
    assert np.array_equal(np.load(entry / "codes.npy"), cat)


def test_clusters_command_on_a_tokenizer_file(assets):
    labels = np.load(assets["cluster_table"])["labels"]
    assert labels.shape == (64,) and set(labels) == set(range(8))


def _two_process_worker(rank, ports, runs):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for port, args in zip(ports, runs):
        # a fresh rendezvous per run: a rank leaving the last barrier early must not tear down
        # the store its peer is still reading
        os.environ["MASTER_PORT"] = str(port)
        cli.main(args)
        parallel.destroy()


@pytest.mark.slow
def test_two_processes_tp2_and_dp2_sample_the_same_videos(assets, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat plays with a ball\nrain falls on a lake\na dog runs\n")
    assert cli.main(_args(assets, prompts, tmp_path / "one", *GREEDY, "batch_size=1")) == 0
    runs = [
        _args(assets, prompts, tmp_path / "tp2", *GREEDY, "tensor_parallel=2"),
        _args(assets, prompts, tmp_path / "dp2", *GREEDY, "batch_size=1"),
    ]
    mp.spawn(_two_process_worker, args=([free_port(), free_port()], runs), nprocs=2, join=True)
    for run in ("tp2", "dp2"):
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert manifest["ok"] == 3
        for entry in manifest["entries"]:
            assert np.array_equal(
                np.load(tmp_path / "one" / entry["key"] / "codes.npy"),
                np.load(tmp_path / run / entry["key"] / "codes.npy"),
            )
    assert [e["worker"] for e in manifest["entries"]] == ["dp0", "dp1", "dp0"]  # prompts split over DP ranks


def test_mismatched_stages_are_refused_before_sampling(assets, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    swapped = {**assets, "stage2_checkpoint": assets["stage1_checkpoint"]}
    assert cli.main(_args(swapped, prompts, tmp_path / "o")) == 2
    assert f"{assets['stage1_checkpoint']}: holds a stage1 model, expected stage2" in capsys.readouterr().err


def test_frame0_checkpoint_of_the_same_backbone_gives_the_same_video(assets, tmp_path):
    from cogvideo.checkpoint import load_model_state
    from cogvideo.models.cogvideo.model import is_backbone_param

    stage1 = assets["stage1_checkpoint"]
    backbone_cfg = load_model_config(stage1).replace(stage="backbone", num_frames=1).validate(2)
    state = {k: v for k, v in load_model_state(stage1, 0, 1).items() if is_backbone_param(k)}
    same = save_model_checkpoint(tmp_path / "backbone", state, backbone_cfg)
    torch.manual_seed(5)
    other = save_model_checkpoint(tmp_path / "other", build_model(backbone_cfg).state_dict(), backbone_cfg)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat plays with a ball\n")

    def video(out, *extra):
        assert cli.main(_args(assets, prompts, tmp_path / out, *GREEDY, *extra)) == 0
        [entry] = [d for d in (tmp_path / out).iterdir() if d.is_dir()]
        return np.load(entry / "codes.npy")

    default = video("default")
    # the stage-1 model with its temporal channel off is its backbone: same frame 0, same video
    assert np.array_equal(video("same", f"frame0_checkpoint={same}"), default)
    assert not np.array_equal(video("other", f"frame0_checkpoint={other}")[0], default[0])


def test_a_video_model_as_frame0_checkpoint_is_refused(assets, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert (
        cli.main(_args(assets, prompts, tmp_path / "o", f"frame0_checkpoint={assets['stage1_checkpoint']}"))
        == 2
    )
    assert (
        f"{assets['stage1_checkpoint']}: holds a stage1 model, expected backbone" in capsys.readouterr().err
    )
