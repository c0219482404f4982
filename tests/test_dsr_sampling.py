"""DSR sampling: the release's one parallel step (cluster strategy, top 6, T2 0.6) at every
high-res slot, per-frame determinism whatever the batching, the image tokenizer at the larger
grid, and `cogvideo-sample` with an SR checkpoint end to end (high-res mp4/gif/sheet, the
low-res codes unchanged)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_sampling_pipeline import _args, assets  # noqa: F401  (the fixture: tiny stages, tokenizers)

from cogvideo.checkpoint import save_model_checkpoint
from cogvideo.family import build_model
from cogvideo.models.cogvideo.hierarchy import row_generator
from cogvideo.models.cogvideo.stage_model import gather_vocab
from cogvideo.models.dsr.config import PRESETS
from cogvideo.models.dsr.layout import build_example
from cogvideo.models.dsr.sampler import SuperResolution, load_model
from cogvideo.sampling import cli
from cogvideo.sampling.clusters import load_cluster_table
from cogvideo.sampling.strategies import ClusterStrategy, MinimumErrorStrategy, PosteriorMean, distribution
from cogvideo.text_format import TextFormat
from cogvideo.tokenizers.patch_vq import PatchVQTokenizer
from cogvideo.tokenizers.text import TextTokenizer


def dsr_config():
    """dsr-tiny reading the stage-1 model of tests/test_sampling_pipeline.py (vocabulary, 4 x 4
    codes of 16 px frames) with its prompts' text budget."""
    return PRESETS["dsr-tiny"]().replace(
        text_length=32,
        image_position_offset=32,
        low_position_offset=33,
        max_position_embeddings=64,
        init_std=0.3,
    )


@pytest.fixture(scope="module")
def sr_checkpoint(tmp_path_factory):
    torch.manual_seed(5)
    cfg = dsr_config().validate()
    return str(
        save_model_checkpoint(tmp_path_factory.mktemp("dsr") / "dsr", build_model(cfg).state_dict(), cfg)
    )


def release_step(
    logits: torch.Tensor, labels: torch.Tensor, u_cluster, u_code, top_k=6, t2=0.6
) -> torch.Tensor:
    """IterativeEntfilterStrategy.forward (dsr_sampling.py) at T 1.0, its two multinomial draws
    made by inverse CDF from the given numbers: cluster mass of softmax(logits), the top 6
    renormalised, one drawn; the other clusters' logits set to -65504; a code from
    softmax(logits / 0.6)."""
    probs = logits.double().softmax(-1)
    mass = torch.zeros(len(logits), int(labels.max()) + 1, dtype=torch.float64).scatter_add_(
        1, labels.expand_as(probs), probs
    )
    best, clusters = mass.topk(top_k)
    best = best / best.sum(-1, keepdim=True)
    pick = (best.cumsum(-1) <= u_cluster[:, None]).sum(-1).clamp(max=top_k - 1)
    chosen = clusters.gather(1, pick[:, None])
    masked = logits.double().masked_fill(labels[None] != chosen, -65504.0)
    code_probs = (masked / t2).softmax(-1)
    return (code_probs.cumsum(-1) <= u_code[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)


def tiny_sr(assets, sr_checkpoint, frames_per_batch=12, **strategy):  # noqa: F811
    model = load_model(sr_checkpoint, "cpu", torch.float64)
    labels = load_cluster_table(assets["cluster_table"], model.cfg.vocab.num_image_tokens)
    options = dict(temperature=1.0, top_k=6, temperature2=0.6) | strategy
    text = TextTokenizer(assets["text_tokenizer"], model.cfg.vocab)
    return SuperResolution(
        model, text, ClusterStrategy(labels, **options), seed=11, frames_per_batch=frames_per_batch
    ), labels


def test_one_parallel_step_is_the_releases_strategy(assets, sr_checkpoint):  # noqa: F811
    sr, labels = tiny_sr(assets, sr_checkpoint)
    cfg = sr.cfg
    g = torch.Generator().manual_seed(0)
    low = torch.randint(cfg.vocab.num_image_tokens, (3, 4, 4), generator=g)
    ids = sr.text_ids("a cat plays with a ball")
    tokens = torch.stack([build_example(cfg, ids, f, torch.zeros(cfg.high_tokens))[0] for f in low])

    def gens():
        return [row_generator(11, "a cat plays with a ball", f"super-resolution/frame{t}") for t in range(3)]

    ours = sr.sample(tokens, gens())
    with torch.no_grad():
        logits = sr.model(tokens, image_only=True).flatten(0, 1)
    fresh = gens()
    u_cluster = torch.cat([torch.rand(cfg.high_tokens, generator=f, dtype=torch.float64) for f in fresh])
    u_code = torch.cat([torch.rand(cfg.high_tokens, generator=f, dtype=torch.float64) for f in fresh])
    expected = release_step(logits, labels, u_cluster, u_code).view(3, cfg.high_tokens)
    assert torch.equal(ours, expected)
    assert not torch.equal(expected, release_step(logits, labels, u_cluster, u_code, top_k=5).view(3, -1))
    assert not torch.equal(expected, release_step(logits, labels, u_cluster, u_code, t2=0.89).view(3, -1))
    assert torch.equal(sr(["a cat plays with a ball"], [low])[0].flatten(1), ours)  # noqa: E201


def test_a_frame_does_not_depend_on_its_batch(assets, sr_checkpoint):  # noqa: F811
    g = torch.Generator().manual_seed(1)
    videos = [torch.randint(64, (5, 4, 4), generator=g), torch.randint(64, (3, 4, 4), generator=g)]
    prompts = ["a cat plays with a ball", "a dog runs"]
    one, _ = tiny_sr(assets, sr_checkpoint, frames_per_batch=1)
    all_at_once, _ = tiny_sr(assets, sr_checkpoint, frames_per_batch=12)
    alone = one(prompts[1:], videos[1:])[0]
    together = all_at_once(prompts, videos)
    assert [v.shape for v in together] == [(5, 12, 12), (3, 12, 12)]
    assert torch.equal(alone, together[1]) and torch.equal(one(prompts, videos)[0], together[0])


def test_the_patch_tokenizer_at_the_high_res_grid():
    """Same patches, more of them: a 3 x 3 tiling of a frame encodes to the tiling of its codes,
    and codes decode to their patches (no context table) at 3x the side."""
    rng = np.random.default_rng(0)
    codebook = torch.from_numpy(rng.random((16, 4 * 4 * 3)).astype(np.float32) * 255)
    low = PatchVQTokenizer(codebook, frame_size=16, tokens_side=4)
    high = low.at_grid(12)
    assert (high.frame_size, high.tokens_side, high.codebook_size) == (48, 12, 16)
    frame = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        high.encode(np.tile(frame, (1, 3, 3, 1))), np.tile(low.encode(frame), (1, 3, 3))
    )
    codes = rng.integers(0, 16, (2, 12, 12))
    pixels = high.decode(codes)
    assert pixels.shape == (2, 48, 48, 3)
    patch = codebook[codes[1, 5, 7]].round().clamp(0, 255).to(torch.uint8).view(4, 4, 3).numpy()
    np.testing.assert_array_equal(pixels[1, 20:24, 28:32], patch)


def test_sample_command_super_resolves_every_frame(assets, sr_checkpoint, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog runs\n")
    keyframes = ["interpolation_levels=0"]  # the keyframes alone: SR runs after whatever stage is last
    assert cli.main([*_args(assets, prompts, tmp_path / "low"), *keyframes]) == 0
    sr = [f"sr_checkpoint={sr_checkpoint}", "sr_strategy.top_k=3"]  # the fixture's table has 8 clusters
    assert cli.main([*_args(assets, prompts, tmp_path / "high"), *keyframes, *sr]) == 0
    manifest = json.loads((tmp_path / "high" / "manifest.json").read_text())
    [entry] = manifest["entries"]
    folder = tmp_path / "high" / entry["key"]
    high, low = np.load(folder / "codes.npy"), np.load(folder / "codes_low.npy")
    assert entry["status"] == "ok" and high.shape == (5, 12, 12) and low.shape == (5, 4, 4)
    np.testing.assert_array_equal(
        low, np.load(tmp_path / "low" / entry["key"] / "codes.npy")
    )  # video unchanged
    gif = Image.open(folder / "video.gif")
    assert gif.size == (48, 48) and gif.n_frames == 5
    assert (
        Image.open(folder / "sheet_row.png").size[1] == 48 and entry["files"]["codes_low"] == "codes_low.npy"
    )
    assert Image.open(tmp_path / "high" / "contact_sheet.png").size[1] >= 96


def test_sample_command_decodes_by_minimum_expected_error_over_the_tokenizers_codebook(
    assets,  # noqa: F811
    sr_checkpoint,
    tmp_path,
):
    """sr_strategy.kind=mbr: every high-res code is the one nearest the expected codebook patch
    under the model's distribution, with the image tokenizer's own codebook as the code vectors."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog runs\n")
    sr = [f"sr_checkpoint={sr_checkpoint}", "sr_strategy.kind=mbr", "sr_strategy.top_k=8"]
    assert cli.main([*_args(assets, prompts, tmp_path / "high"), "interpolation_levels=0", *sr]) == 0
    [entry] = json.loads((tmp_path / "high" / "manifest.json").read_text())["entries"]
    high = np.load(tmp_path / "high" / entry["key"] / "codes.npy")
    low = torch.from_numpy(np.load(tmp_path / "high" / entry["key"] / "codes_low.npy"))
    model = load_model(sr_checkpoint, "cpu", torch.float32)
    cfg = model.cfg
    text = TextTokenizer(assets["text_tokenizer"], cfg.vocab).encode("a dog runs")  # the raw prompt
    tokens = torch.stack([build_example(cfg, text, f, torch.zeros(cfg.high_tokens))[0] for f in low])
    with torch.no_grad():
        logits = gather_vocab(model(tokens, image_only=True))[..., : cfg.vocab.num_image_tokens]
    codebook = PatchVQTokenizer.load(assets["image_tokenizer"]).codebook()
    expected = torch.stack([MinimumErrorStrategy(codebook, 1.0, top_k=8).sample(f) for f in logits])
    np.testing.assert_array_equal(high.reshape(len(low), -1), expected.numpy())
    assert (expected != logits.argmax(-1)).float().mean() > 0.1  # not the greedy codes


def test_sample_command_hands_out_the_posterior_mean_frames(assets, sr_checkpoint, tmp_path):  # noqa: F811
    """sr_strategy.kind=mean: no code; every high-res frame is the image tokenizer's expected decode
    (decode_mean at the high-res grid) of the model's distribution at each slot, rounded to uint8,
    in pixels.npy (the mp4 / gif show it); the low-res video is the same as with codes."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog runs\n")
    sr = [f"sr_checkpoint={sr_checkpoint}", "sr_strategy.kind=mean", "sr_strategy.temperature=0.8"]
    assert cli.main([*_args(assets, prompts, tmp_path / "high"), "interpolation_levels=0", *sr]) == 0
    [entry] = json.loads((tmp_path / "high" / "manifest.json").read_text())["entries"]
    folder = tmp_path / "high" / entry["key"]
    assert not (folder / "codes.npy").exists() and entry["files"]["pixels"] == "pixels.npy"
    pixels = np.load(folder / "pixels.npy")
    low = torch.from_numpy(np.load(folder / "codes_low.npy"))
    assert pixels.dtype == np.uint8 and pixels.shape == (5, 48, 48, 3) and low.shape == (5, 4, 4)
    model = load_model(sr_checkpoint, "cpu", torch.float32)
    cfg = model.cfg
    text = TextTokenizer(assets["text_tokenizer"], cfg.vocab).encode("a dog runs")
    tokens = torch.stack([build_example(cfg, text, f, torch.zeros(cfg.high_tokens))[0] for f in low])
    with torch.no_grad():
        logits = gather_vocab(model(tokens, image_only=True))[..., : cfg.vocab.num_image_tokens]
    decoder = PatchVQTokenizer.load(assets["image_tokenizer"]).at_grid(cfg.high_frame_tokens)
    probs = distribution(logits.reshape(-1, logits.shape[-1]), 0.8, 0, 1.0).view(len(low), 12, 12, -1)
    expected = decoder.decode_mean(probs).round().clamp(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(pixels, expected)
    mbr = decoder.decode(
        torch.stack([MinimumErrorStrategy(decoder.codebook(), 0.8).sample(f) for f in logits])
        .view(-1, 12, 12)
        .numpy()
    )
    assert (pixels != mbr).mean() > 0.1  # not one code's decode per slot
    gif = Image.open(folder / "video.gif")
    assert gif.size == (48, 48) and gif.n_frames == 5


def test_the_posterior_mean_is_for_the_last_stage_and_a_tokenizer_that_can_decode_it(tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog runs\n")
    out = ["--prompts", str(prompts), "--out", str(tmp_path / "o"), "interpolation_levels=0"]
    assert cli.main([*out, "stage1_strategy.kind=mean"]) == 2
    assert "stage1_strategy.kind=mean hands out expected pixels" in capsys.readouterr().err
    model = type("Model", (), {"cfg": None})()

    class CodesOnly:  # icetk's tokenizer: a convolutional decoder, no exact expected decode
        pass

    with pytest.raises(ValueError, match="kind=mean decodes the expected frame through the image tokenizer"):
        SuperResolution(model, None, PosteriorMean(1.0), seed=0, decoder=CodesOnly())


def test_sr_text_uncond_reads_the_checkpoints_guidance_caption_for_every_frame(
    assets,  # noqa: F811
    tmp_path,
):
    """sr_text=uncond: every frame reads the SR checkpoint's guidance caption (its text format's
    uncond_text) instead of its prompt; the low-res video is the same, and with a deterministic
    strategy the high-res codes are exactly those of the guidance caption given as the prompt."""
    torch.manual_seed(5)
    cfg = dsr_config().validate()
    guidance = "a dog runs"  # the tiny tokenizer's words (the release's "视频" is not among them)
    path = save_model_checkpoint(
        tmp_path / "dsr", build_model(cfg).state_dict(), cfg, text_format=TextFormat("{caption}", guidance)
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat plays with a ball\n")
    sr = [f"sr_checkpoint={path}", "sr_strategy.kind=mbr", "interpolation_levels=0"]
    runs = {}
    for text in ("prompt", "uncond"):
        assert cli.main([*_args(assets, prompts, tmp_path / text), *sr, f"sr_text={text}"]) == 0
        [entry] = json.loads((tmp_path / text / "manifest.json").read_text())["entries"]
        runs[text] = [np.load(tmp_path / text / entry["key"] / f) for f in ("codes.npy", "codes_low.npy")]
    np.testing.assert_array_equal(runs["uncond"][1], runs["prompt"][1])  # the same low-res video
    model = load_model(path, "cpu", torch.float32)
    text = TextTokenizer(assets["text_tokenizer"], cfg.vocab)
    codebook = PatchVQTokenizer.load(assets["image_tokenizer"]).codebook()
    reference = SuperResolution(model, text, MinimumErrorStrategy(codebook, 1.0), seed=0)
    low = torch.from_numpy(runs["prompt"][1])
    for text, caption in (("prompt", "a cat plays with a ball"), ("uncond", guidance)):
        np.testing.assert_array_equal(runs[text][0], reference([caption], [low])[0].numpy())
    assert not np.array_equal(runs["uncond"][0], runs["prompt"][0])  # the text matters to this model


def test_sr_text_is_checked(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog runs\n")
    out = ["--prompts", str(prompts), "--out", str(tmp_path / "o")]
    assert cli.main([*out, "sr_text=uncond", "interpolation_levels=0"]) == 2
    assert "sr_text=uncond needs sr_checkpoint" in capsys.readouterr().err
    assert cli.main([*out, "sr_text=caption"]) == 2
    assert "sr_text" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_command_on_ray_super_resolves_as_the_local_run(assets, sr_checkpoint, tmp_path):  # noqa: F811
    """The Ray batch job with an SR checkpoint: two actors, each loading the stages and the SR model
    once, give every prompt the high-res codes, frames and low-res codes of the local run."""
    pytest.importorskip("ray")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog runs\na cat sleeps\n")
    sr = [f"sr_checkpoint={sr_checkpoint}", "sr_strategy.top_k=3", "sr_frames_per_batch=4", "batch_size=1"]
    assert cli.main([*_args(assets, prompts, tmp_path / "local"), *sr]) == 0
    assert cli.main([*_args(assets, prompts, tmp_path / "ray"), *sr, "workers=2", "--ray"]) == 0
    entries = json.loads((tmp_path / "ray" / "manifest.json").read_text())["entries"]
    assert [e["status"] for e in entries] == ["ok", "ok"]
    for entry in entries:
        local, ray = tmp_path / "local" / entry["key"], tmp_path / "ray" / entry["key"]
        high = np.load(ray / "codes.npy")
        assert high.shape == (9, 12, 12) and np.load(ray / "codes_low.npy").shape == (9, 4, 4)
        for name in ("codes.npy", "codes_low.npy"):
            np.testing.assert_array_equal(np.load(ray / name), np.load(local / name))
        assert (ray / "video.gif").read_bytes() == (local / "video.gif").read_bytes()
        assert Image.open(ray / "video.gif").size == (48, 48)


def test_an_sr_checkpoint_for_other_frames_is_refused(assets, tmp_path, capsys):  # noqa: F811
    cfg = dsr_config().replace(frame_tokens=2, frame_size=8, high_frame_tokens=6).validate()
    path = save_model_checkpoint(tmp_path / "other", build_model(cfg).state_dict(), cfg)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog runs\n")
    assert cli.main([*_args(assets, prompts, tmp_path / "o"), f"sr_checkpoint={path}"]) == 2
    assert "model.frame_tokens differs" in capsys.readouterr().err
