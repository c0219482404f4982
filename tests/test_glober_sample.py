"""`cogvideo-sample --family glober`: a phase-generator checkpoint samples the outputs every family
writes (mp4, gif, contact sheet, records, manifest), any number of frames, resumes, runs as the
Ray job with the local run's videos, and each video is what GLOBER's sampler gives for the
prompt's caption, guidance text and seeded noise (the pipeline adds no step of its own)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_pretrain_data import write_caption_tokenizer

from cogvideo.checkpoint.format import save_model_checkpoint
from cogvideo.family import build_model, resolve_model_section
from cogvideo.models.glober.batch import padded_text
from cogvideo.models.glober.pipeline import GloberPipeline, GloberSampleOptions
from cogvideo.models.glober.sampler import GloberSampler, frame_indices
from cogvideo.raystart import start_ray
from cogvideo.sampling.cli import main as sample_main
from cogvideo.sampling.prompts import read_prompts
from cogvideo.text_format import TextFormat

TEXT_FORMAT = TextFormat(uncond_text="clip", uncond_prefix=False)
PROMPTS = ["clip 1 2", "clip 3 4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("glober_sample")
    cfg = resolve_model_section(
        {"family": "glober", "preset": "glober-tiny", "phase": "generator", "text_length": 16}
    )
    torch.manual_seed(0)
    state = build_model(cfg, device="cpu").state_dict()
    g = torch.Generator().manual_seed(1)  # off the initialisation: adaLN-Zero and zero convs reach the output
    state = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in state.items()}
    checkpoint = save_model_checkpoint(root / "ckpt", state, cfg, text_format=TEXT_FORMAT)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {
        "root": root,
        "checkpoint": checkpoint,
        "tokenizer": write_caption_tokenizer(root),
        "prompts": prompts,
    }


def options(ws, **changes) -> list[str]:
    fields = {
        "checkpoint": ws["checkpoint"],
        "text_tokenizer": ws["tokenizer"],
        "global_steps": 2,
        "frame_steps": 2,
        "frames": 5,
        "frame_batch": 4,
        "duration": 2.0,
    } | changes
    return [f"{k}={v}" for k, v in fields.items()]


def sample(ws, out: str, *argv: str, **changes) -> dict:
    code = sample_main(
        [
            "--family",
            "glober",
            "--prompts",
            str(ws["prompts"]),
            "--out",
            str(ws["root"] / out),
            *argv,
            *options(ws, **changes),
        ]
    )
    assert code in (0, None)
    return json.loads((ws["root"] / out / "manifest.json").read_text())


def gif(ws, out: str, entry: dict) -> bytes:
    """The entry's GIF: written deterministically from its frames."""
    return (ws["root"] / out / entry["key"] / "video.gif").read_bytes()


def test_the_help_lists_globers_options(capsys):
    with pytest.raises(SystemExit):
        sample_main(["--family", "glober", "--help"])
    out = capsys.readouterr().out
    assert "frame_guidance = 6.0" in out and "global_guidance = 9.0" in out and "frames = 0" in out


def test_sampling_writes_every_output_and_resumes(ws, monkeypatch):
    manifest = sample(ws, "local")
    out = ws["root"] / "local"
    assert (out / "contact_sheet.png").is_file() and len(manifest["entries"]) == len(PROMPTS)
    for entry in manifest["entries"]:
        assert entry["status"] == "ok" and entry["frames"] == 5
        assert {"video.mp4", "video.gif", "pixels.npy"} <= {p.name for p in (out / entry["key"]).iterdir()}
        pixels = np.load(out / entry["key"] / "pixels.npy", allow_pickle=False)  # the exact frames
        assert pixels.dtype == np.uint8 and pixels.shape == (5, 16, 16, 3)
    called = []
    monkeypatch.setattr(GloberPipeline, "sample", lambda self, prompts: called.append(prompts) or [])
    sample(ws, "local")  # every prompt recorded ok: nothing is sampled again
    assert called == []


@pytest.mark.parametrize("shared", [False, True])
def test_a_video_is_the_samplers_for_its_caption_and_seeded_noise(ws, shared):
    """Independent of the pipeline: the caption and guidance text in the checkpoint's format, the
    prompt's generator drawing the global noise then the frames' noise (one draw for all frames
    with shared_frame_noise), GLOBER's sampler."""
    opts = GloberSampleOptions(
        checkpoint=str(ws["checkpoint"]),
        text_tokenizer=ws["tokenizer"],
        global_steps=2,
        frame_steps=2,
        frames=5,
        duration=2.0,
        shared_frame_noise=shared,
    )
    pipeline = GloberPipeline.load(opts)
    prompt = read_prompts(ws["prompts"]).prompts[1]
    ((_, video, arrays),) = pipeline.sample([prompt])
    cfg, tokenizer = pipeline.cfg, pipeline.tokenizer
    g = pipeline._generator(prompt)
    noise = torch.randn(1, *cfg.global_shape, generator=g)
    frame_noise = torch.randn(1, 1 if shared else 5, *cfg.latent_shape, generator=g).expand(1, 5, -1, -1, -1)
    text = padded_text(cfg, tokenizer.encode(TEXT_FORMAT.text(prompt.text, 2.0)))[None]
    uncond = padded_text(cfg, tokenizer.encode("clip"))[None]  # the guidance text: no prefix
    sampler = GloberSampler(pipeline.model, opts.sampling())
    v = sampler.global_features(text, uncond, noise)
    expected = sampler.pixels(sampler.frames(v, frame_indices(5), frame_noise))[0]
    expected = ((expected + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(video, expected) and np.array_equal(arrays["pixels"], video)
    assert not np.array_equal(video[0], video[-1])  # the frames differ by their index


def test_a_prompts_video_does_not_depend_on_its_batch(ws):
    one = sample(ws, "batch1", batch_size=1)
    two = sample(ws, "batch2", batch_size=2)
    for a, b in zip(one["entries"], two["entries"]):
        assert gif(ws, "batch1", a) == gif(ws, "batch2", b)


@pytest.mark.slow
def test_the_ray_job_samples_the_local_videos(ws):
    import ray

    start_ray(num_cpus=2, log_to_driver=False)
    try:
        manifest = sample(ws, "ray", "--ray", workers=1)
    finally:
        ray.shutdown()
    local = sample(ws, "local")
    assert all(e["worker"].startswith("actor-") for e in manifest["entries"])
    for a, b in zip(manifest["entries"], local["entries"]):
        assert gif(ws, "ray", a) == gif(ws, "local", b)


def test_the_checkpoint_reshards_by_globers_plan(ws, tmp_path):
    """TP 2 by hand: the DiT's QKV as [Q_r; K_r; V_r], its MLP's first layer and the caption
    embedding by rows, the attention output and the MLP's second layer by columns; everything
    else (the whole auto-encoder) whole on each rank."""
    from cogvideo.checkpoint import Checkpoint, load_model_state, reshard
    from cogvideo.checkpoint.cli import describe

    def by_hand(name: str, t: torch.Tensor, r: int) -> torch.Tensor:
        if name.endswith(("attention.qkv.weight", "attention.qkv.bias")):
            return torch.cat([x.chunk(2)[r] for x in t.chunk(3)])
        if name.endswith(("mlp.fc1.weight", "mlp.fc1.bias")) or name == "dit.text_embeddings.weight":
            return t.chunk(2)[r]
        return t.chunk(2, dim=1)[r] if name.endswith(("attention.proj.weight", "mlp.fc2.weight")) else t

    full = load_model_state(ws["checkpoint"])
    tp2 = Checkpoint(reshard(ws["checkpoint"], tmp_path / "tp2", 2))
    for rank in range(2):
        for name, tensor in full.items():
            assert torch.equal(tp2.readers[rank].get(name), by_hand(name, tensor, rank)), name
    info = describe(tmp_path / "tp2")
    assert info["family"] == "glober" and info["tensor_parallel"] == 2 and info["complete"]
    back = load_model_state(tmp_path / "tp2")  # merged again: the original
    assert all(torch.equal(back[n], t) for n, t in full.items())
