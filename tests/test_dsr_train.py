"""DSR training on the family seam: token shards carrying both grids (`frames`, `sr_frames`), the
family's batch builder and loss (text + low-res given, loss on the high-res codes), started from
a CogView2 backbone as the release's `reinit` does (backbone frozen); through `cogvideo-train`
(DeepSpeed ZeRO-2, gloo CPU): TP=2 equals TP=1, and a run killed (SIGKILL) in a checkpoint save
resumes to exactly the uninterrupted run; `cogvideo-prep model.family=dsr` writes the pairs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from process_helpers import write_kill_in_save_script
from ray_prep import prep_on_ray
from test_pretrain_data import write_caption_tokenizer
from test_pretrain_dist import losses, step_batches, torchrun
from tolerances import adam_weight_atol, loss_rel_tol

from cogvideo.checkpoint.format import load_model_state, save_model_checkpoint
from cogvideo.family import build_model, resolve_model_section
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.dsr import sample_problem
from cogvideo.models.dsr.model import is_dsr_param
from cogvideo.shards import ClipMeta, Sample, encode_sample
from pretrain.config import DataConfig
from pretrain.data import ShardLoader

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.family=dsr", "model.preset=dsr-tiny", "model.text_length=8"]  # room for the captions
CFG = resolve_model_section({"family": "dsr", "preset": "dsr-tiny", "text_length": 8})
LR, STEPS = 2e-3, 4


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / f"step{STEPS:08d}/model_full.pt")


def write_pair_shards(root: Path, num_shards=2, per_shard=6, seed=0) -> list[str]:
    """One-frame samples with random low-res and high-res codes, captions `clip s i`."""
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(num_shards):
        path = str(root / f"pairs-{s:03d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(per_shard):
                arrays = {
                    "frames": rng.integers(
                        0, CFG.vocab.num_image_tokens, (1, CFG.frame_tokens, CFG.frame_tokens)
                    ),
                    "sr_frames": rng.integers(
                        0, CFG.vocab.num_image_tokens, (1, CFG.high_frame_tokens, CFG.high_frame_tokens)
                    ),
                }
                meta = ClipMeta(
                    duration=0.0, fps=1.0, stage=1, source=f"v{s}", clip_start=i, clip_end=i + 1, num_frames=1
                )
                sink.write(encode_sample(f"s{s}_{i}", arrays, f"clip {s} {i}", meta))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Pair shards, a text tokenizer and a CogView2 backbone of DSR's shape."""
    root = tmp_path_factory.mktemp("dsr_train")
    backbone_cfg = get_preset("tiny").replace(
        stage="backbone", num_frames=1, max_position_embeddings=CFG.max_position_embeddings
    )
    torch.manual_seed(0)
    save_model_checkpoint(root / "backbone", build_model(backbone_cfg.validate()).state_dict(), backbone_cfg)
    return {
        "root": root,
        "shards": write_pair_shards(root),
        "tokenizer": write_caption_tokenizer(root),
        "backbone": str(root / "backbone"),
    }


def test_the_batch_builder_gives_text_low_res_given_and_high_res_targets(ws):
    text_ids = [CFG.vocab.text_id(5), CFG.vocab.text_id(9)]
    loader = ShardLoader(
        ws["shards"],
        CFG,
        lambda t: text_ids,
        DataConfig(stage=1, shuffle_buffer=0),
        micro_batch_size=2,
        seed=0,
    )
    batch = next(iter(loader))
    tokens, targets = batch.tensors["tokens"], batch.tensors["targets"]
    assert tokens.shape == (2, CFG.seq_length) and targets.shape == (2, CFG.high_tokens)
    assert tokens[:, CFG.text_length - 2 : CFG.text_length].tolist() == [text_ids] * 2
    assert (tokens[:, : CFG.text_length - 2] == CFG.text_pad_id).all()
    assert (tokens[:, CFG.high_start :] == CFG.vocab.boi_id).all()  # the high-res codes are never inputs


def test_caption_dropout_gives_dropped_pairs_the_guidance_caption_and_their_own_frames(ws):
    """data.caption_dropout on DSR's pairs (what sampling's sr_text=uncond reads): a dropped pair's
    text is the text format's guidance caption ("视频", no duration prefix under DSR's "{caption}"
    template); its low-res input and high-res targets are its own; the others are untouched."""
    ids: dict[str, list[int]] = {}  # each distinct text its own one-token id

    def encode(text: str) -> list[int]:
        return ids.setdefault(text, [CFG.vocab.text_id(len(ids) + 1)])

    data = dict(stage=1, shuffle_buffer=0, prefix_template="{caption}")
    plain = ShardLoader(ws["shards"], CFG, encode, DataConfig(**data), micro_batch_size=1, seed=0)
    loader = ShardLoader(
        ws["shards"], CFG, encode, DataConfig(**data, caption_dropout=0.5), micro_batch_size=1, seed=0
    )
    dropped = []
    for sample in loader.samples():
        got, own = loader.to_example(sample), plain.to_example(sample)
        text = CFG.text_length
        assert torch.equal(got["tokens"][text:], own["tokens"][text:])  # the low-res codes and slots
        assert torch.equal(got["targets"], own["targets"])
        expected = ids["视频"] if loader._dropped(sample.key) else encode(sample.caption)
        assert got["tokens"][text - 1 : text].tolist() == expected
        dropped.append(loader._dropped(sample.key))
        if len(dropped) == 12:  # one epoch
            break
    assert 0 < sum(dropped) < 12


def test_samples_without_the_high_res_grid_are_refused_by_name():
    meta = ClipMeta(duration=0.0, fps=1.0, stage=1, source="v", clip_start=0, clip_end=1, num_frames=1)
    low = np.zeros((1, 4, 4), np.int64)
    assert "no sr_frames" in sample_problem(CFG, Sample("k", {"frames": low}, "c", meta))
    wrong = Sample("k", {"frames": low, "sr_frames": np.zeros((1, 8, 8), np.int64)}, "c", meta)
    assert "do not fit the model's" in sample_problem(CFG, wrong)


def train_args(ws, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs/tiny_test.yaml"),
        *MODEL,
        f"data.shards=[{','.join(ws['shards'])}]",
        f"data.text_tokenizer={ws['tokenizer']}",
        "data.prefix_template='{caption}'",  # the release's DSR text: the raw prompt
        f"init.backbone={ws['backbone']}",
        f"checkpoint.dir={run_dir}",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=3",
        "checkpoint.export_full=true",
        "logging.sample_keys=true",
        f"training.max_steps={STEPS}",
        f"optim.lr={LR}",
        "parallel.precision=fp32",
        "parallel.zero_stage=2",
        *extra,
    ]


def run(ws, name: str, nproc: int, *extra: str, script=None, env=None):
    run_dir = ws["root"] / name
    return run_dir, torchrun(nproc, train_args(ws, run_dir, *extra), script=script, env=env, timeout=900)


@pytest.fixture(scope="module")
def tp1(ws):
    run_dir, proc = run(ws, "tp1", 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir


@pytest.mark.slow
def test_training_from_the_backbone_trains_only_dsr_parameters(ws, tp1):
    backbone, trained = load_model_state(ws["backbone"]), final_weights(tp1)
    for name, value in trained.items():
        if is_dsr_param(name):
            continue
        assert torch.equal(value, backbone[name]), f"{name}: the frozen backbone moved"
    moved = [n for n in trained if is_dsr_param(n) and n.endswith("weight")]
    start = build_model(CFG, device="cpu").state_dict()  # shapes only; the start is the reinit
    assert set(moved) == {n for n in start if is_dsr_param(n) and n.endswith("weight")}
    q = trained["layers.0.high_attention.query_key_value.weight"]
    assert not torch.equal(
        q, backbone["layers.0.attention.query_key_value.weight"]
    )  # trained away from the copy
    assert losses(tp1)[STEPS] < losses(tp1)[1]


@pytest.fixture(scope="module")
def tp2(ws):
    """A TP=2 run SIGKILLed in the save of its last step (4), after DeepSpeed and the full-model
    export wrote it and before it is marked complete: until then an uninterrupted run. Its logs
    are moved to `<root>/tp2_uninterrupted` and its exported weights kept; then it is resumed
    with --resume auto (from step 2), whose logs hold only the resumed run's own rows."""
    script = write_kill_in_save_script(ws["root"] / "kill.py", step=STEPS)
    args = ("parallel.tensor_parallel=2", "--resume", "auto")
    run_dir, killed = run(ws, "tp2", 2, *args, script=str(script), env={"PYTHONPATH": str(ROOT)})
    assert killed.returncode != 0 and (run_dir / "latest").read_text() == "step00000002", killed.stderr[
        -4000:
    ]
    uninterrupted = ws["root"] / "tp2_uninterrupted"
    uninterrupted.mkdir()
    (run_dir / "logs").rename(uninterrupted / "logs")
    weights = final_weights(run_dir)
    _, finished = run(ws, "tp2", 2, *args)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return {
        "resumed": run_dir,
        "uninterrupted": uninterrupted,
        "weights": weights,
        "output": finished.stdout + finished.stderr,
    }


@pytest.mark.slow
def test_tp2_equals_tp1(tp1, tp2):
    run_dir = tp2["uninterrupted"]
    assert step_batches(run_dir) == step_batches(tp1)
    one, two = losses(tp1), losses(run_dir)
    rel = loss_rel_tol(CFG.num_layers)
    assert sorted(two) == sorted(one) and all(two[s] == pytest.approx(one[s], rel=rel) for s in one)
    a, b = final_weights(tp1), tp2["weights"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=adam_weight_atol(LR), msg=name)


@pytest.mark.slow
def test_a_killed_tp2_run_resumes_exactly(tp2):
    """Resumed from step 2, the run's own steps 3 and 4 are the uninterrupted run's losses and
    batches, and its final weights those weights, bit for bit."""
    resumed, uninterrupted = tp2["resumed"], tp2["uninterrupted"]
    assert "resumed from" in tp2["output"]
    before = losses(uninterrupted)
    assert sorted(before) == [1, 2, 3, 4] and losses(resumed) == {s: before[s] for s in (3, 4)}
    assert step_batches(resumed) == {s: step_batches(uninterrupted)[s] for s in (3, 4)}
    a, b = tp2["weights"], final_weights(resumed)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_prep_writes_both_grids_for_the_dsr_family(tmp_path):
    """cogvideo-prep model.family=dsr: frames read at 48 px; sr_frames their 12 x 12 codes, frames
    the 4 x 4 codes of their 16 px area average, with the same patch tokenizer."""

    import data_prep.synthetic as syn
    from cogvideo.tokenizers.patch_vq import PatchVQTokenizer

    rng = np.random.default_rng(0)
    tokenizer = PatchVQTokenizer(rng.random((64, 4 * 4 * 3)).astype(np.float32) * 255, 16, 4, preset="tiny")
    tokenizer.save(tmp_path / "image.safetensors")
    rows = syn.plan_videos(2, seed=1, size=48, fps=8, duration_s=(2.0,))
    captions = syn.write_videos(tmp_path / "videos", rows)
    summary, shards, samples = prep_on_ray(
        tmp_path, captions, *MODEL, "stages=[1]", f"tokenizer={tmp_path / 'image.safetensors'}"
    )
    assert summary["samples"] == len(samples) > 0
    high = tokenizer.at_grid(12)
    reference = {r["path"]: syn.render_row(r) for r in rows}
    for sample in samples:
        assert sample_problem(CFG, sample) is None
        truth = reference[os.path.basename(sample.meta.source)]
        # the stored codes are the tokenizer's codes of one of the video's rendered frames
        assert any(np.array_equal(high.encode(f[None])[0], sample.arrays["sr_frames"][0]) for f in truth)
        small = np.rint(truth.reshape(len(truth), 16, 3, 16, 3, 3).mean(axis=(2, 4))).astype(np.uint8)
        assert any(np.array_equal(tokenizer.encode(f[None])[0], sample.arrays["frames"][0]) for f in small)
