"""HPDM as a model family: registered with its presets, built lean and initialised by its own
init, its analytic FLOPs against torch's FLOP counter (plus every attention call tallied), its
planner memory against autograd's saved tensors, TP=2 equal to TP=1 on the loss and every
gradient, and the commands that list and plan it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_hpdm_model import CFG
from torch.utils.flop_counter import FlopCounterMode

from cogvideo import parallel
from cogvideo.family import build_model, family_of, resolve_model_section
from cogvideo.models.hpdm import planner
from cogvideo.models.hpdm.loss import pyramid_loss, training_example
from cogvideo.models.hpdm.model import TP_PLAN
from pretrain.launch import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

# wide, with the interface self-attention (CFG without): FLOPs, memory and TP count both
WIDE = CFG.replace(
    interface_dim=64,
    latent_dim=32,
    num_latents=16,
    latent_layers=2,
    patch=(2, 16, 16),
    interface_attention=True,
)


def batch_of(cfg, size=2, seed=0):
    video = torch.randint(
        0, 256, (*cfg.video_size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    examples = [
        training_example(cfg, video, torch.tensor(s % cfg.num_classes), seed + s) for s in range(size)
    ]
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def test_the_family_resolves_builds_and_initialises_by_its_own_init():
    cfg = resolve_model_section({"family": "hpdm", "preset": "hpdm-demo", "latent_layers": 2})
    assert family_of(cfg).name == "hpdm" and cfg.latent_layers == 2 and family_of(cfg).shard_kind == "frames"
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    assert not model.head.weight.any() and not model.blocks[1].read_latents.modulation.weight.any()
    assert torch.equal(model.blocks[0].write_interface.weight, torch.ones(cfg.interface_dim))
    assert float(model.time_positions.std()) > 0.5  # the demo preset's unit-normal position tables
    std = float(model.blocks[0].write_ff.fc1.weight.detach().std())
    assert abs(std / cfg.init_std - 1) < 0.05


@pytest.mark.parametrize("head_overlap", [False, True])
def test_flops_are_torchs_count_of_every_product(monkeypatch, head_overlap):
    """Linear layers: torch's FLOP counter (noise, condition and modulation vectors left out, as
    the analytic count leaves them; `head_overlap`'s fixed blend too); attention: every
    scaled_dot_product_attention call tallied."""
    cfg = WIDE.replace(head_overlap=head_overlap)
    model = build_model(cfg, device="cpu")
    attention = []
    sdpa = F.scaled_dot_product_attention

    def tally(q, k, v, **kwargs):
        attention.append(2 * 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", tally)
    with FlopCounterMode(display=False) as counter:
        pyramid_loss(cfg, model, batch_of(cfg), torch.device("cpu"))
    per_module = counter.get_flop_counts()
    leaves = [
        n
        for n in per_module
        if n.startswith("HPDMModel.") and not any(m.startswith(n + ".") for m in per_module)
    ]
    linear = sum(sum(per_module[n].values()) for n in leaves if ".modulation" not in n and "time_fc" not in n)
    groups = {m.name: m.forward for m in planner.matmuls(cfg)}
    attn = sum(
        groups.pop(n) for n in ("read / write attention", "latent attention", "interface self-attention")
    )
    assert 2 * sum(groups.values()) == linear  # batch of 2
    assert 2 * attn == sum(attention)
    assert planner.train_flops(cfg) == 3 * planner.forward_flops(cfg)


def saved_tensor_bytes(cfg, batch):
    """Bytes of the distinct tensors autograd saves, each at its own size: the q, k and v views
    of one qkv product count a third of its storage each, not all of it three times."""
    model = build_model(cfg, device="cpu")
    params, seen = {p.data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.data_ptr() not in params:
            own = min(t.untyped_storage().nbytes(), t.numel() * t.element_size())
            seen.setdefault((t.data_ptr(), tuple(t.shape)), own)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pyramid_loss(cfg, model, batch_of(cfg, batch), torch.device("cpu"))
    return sum(seen.values())


@pytest.mark.parametrize("cfg", [CFG, WIDE], ids=["narrow", "wide"])
def test_planner_activations_are_autograds_saved_tensors_within_5_percent(cfg, monkeypatch):
    """What the analytic count leaves out (the condition vectors, modulation outputs, the grids
    and interpolation weights of grid_sample) or counts twice is a few percent; a missed
    (block, level) run is more (planted below)."""
    measured = {batch: saved_tensor_bytes(cfg, batch) for batch in (1, 3)}
    for batch in (1, 3):
        estimate = planner.activation_bytes(cfg, batch, 1, "fp32", False)
        assert abs(estimate / measured[batch] - 1) < 0.05
    runs = planner.block_runs
    monkeypatch.setattr(planner, "block_runs", lambda c: runs(c)[:-1])
    assert abs(planner.activation_bytes(cfg, 1, 1, "fp32", False) / measured[1] - 1) > 0.05


def _tp_worker(rank, port, full, batch, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    parallel.init_distributed(tensor_parallel=2, backend="gloo")
    model = build_model(WIDE, device="cpu", init_weights=False)
    model.load_state_dict(TP_PLAN.shard_state_dict(full, parallel.tp_rank(), 2))
    loss = pyramid_loss(WIDE, model, batch, torch.device("cpu"))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, grads, group=parallel.tp_group())
    if rank == 0:
        torch.save((loss.detach(), TP_PLAN.merge_state_dicts(gathered)), os.path.join(out_dir, "tp2.pt"))
    parallel.destroy()


@pytest.mark.slow
def test_tp2_equals_tp1_on_the_loss_and_every_gradient(tmp_path):
    from tolerances import FP32_EPS, loss_rel_tol

    torch.manual_seed(0)
    reference = build_model(WIDE, device="cpu")
    full = {n: t + 0.05 * torch.randn_like(t) for n, t in reference.state_dict().items()}  # nothing zero
    reference.load_state_dict(full)
    batch = batch_of(WIDE, 2)
    loss = pyramid_loss(WIDE, reference, batch, torch.device("cpu"))
    loss.backward()
    # spawned, not forked: a fork of a process with threads (pytest-xdist's worker has several) can
    # copy a lock another thread holds, and the rank then hangs (seen: in gloo's teardown)
    mp.spawn(_tp_worker, args=(free_port(), full, batch, str(tmp_path)), nprocs=2)
    tp_loss, tp_grads = torch.load(tmp_path / "tp2.pt", weights_only=True)
    assert abs(float(tp_loss) / float(loss) - 1) < loss_rel_tol(WIDE.num_layers)
    for name, param in reference.named_parameters():
        scale = float(param.grad.abs().max())
        assert torch.allclose(tp_grads[name], param.grad, atol=1e3 * FP32_EPS * scale), name
    assert set(tp_grads) == {n for n, p in reference.named_parameters()}


def test_params_and_plan_commands_list_and_plan_the_family(capsys):
    from cluster.plan import main as plan_main
    from cogvideo.params import main as params_main

    params_main(["hpdm-s", "hpdm-l"])
    out = capsys.readouterr().out
    assert "hpdm-s             hpdm         180,566,064" in out and "719,370,288" in out
    plan_main(
        [
            "model.family=hpdm",
            "model.preset=hpdm-s",
            "parallel.precision=fp32",
            "--gpus",
            "8",
            "--gpu",
            "h100",
        ]
    )
    out = capsys.readouterr().out
    assert "hpdm-s: 3-level pyramid of 16x64x64 patches" in out and "fits" in out


def test_auto_precision_is_full_precision_for_this_family():
    """The supplement found mixed precision (fp16 or bf16) converged worse: the family excludes
    both from `auto`, in training and in sampling; named precisions are still honoured."""
    from cogvideo.family import get_family
    from cogvideo.precision import choose_precision
    from pretrain.config import load_train_config
    from pretrain.train import run_precision

    assert get_family("hpdm").auto_excludes == ("bf16", "fp16")
    cfg = load_train_config(None, ["model.family=hpdm", "model.preset=hpdm-demo", "parallel.precision=auto"])
    choice = run_precision(cfg, resolve_model_section(cfg.model), None)
    assert choice.precision == "fp32"
    low = choice.figures.low_precision
    assert low is None or "excluded" in choice.reason
    cfg = load_train_config(None, ["model.family=hpdm", "model.preset=hpdm-demo", "parallel.precision=bf16"])
    assert run_precision(cfg, resolve_model_section(cfg.model), None).precision == "bf16"
    assert choose_precision("auto", excluded=get_family("hpdm").auto_excludes).precision == "fp32"


def test_data_preparation_writes_raw_frames_at_the_finest_level_and_odd_samples_are_named():
    """cogvideo-prep model.family=hpdm picks the raw-frame encoder, at the pyramid's finest size
    (the Ray job itself is tests/test_shard_kinds.py's, for any frames family); samples that do
    not fit are named by the family's check (the loader skips and counts them)."""
    import numpy as np

    from cogvideo.family import get_family
    from cogvideo.shards import ClipMeta, Sample
    from data_prep.config import PrepConfig, prep_model
    from data_prep.encoders import PixelEncoder, encoder_for

    prep = PrepConfig(model={"family": "hpdm", "preset": "hpdm-demo"})
    assert encoder_for(prep) is PixelEncoder
    model = prep_model(PixelEncoder.settle(prep))
    assert (model.num_frames, model.frame_size) == (5, 32)
    family = get_family("hpdm")
    meta = ClipMeta(1.0, 4.0, 1, "v.mp4", 0.0, 1.0, 5, kind="frames")
    good = Sample("k", {"pixels": np.zeros((5, 32, 32, 3), np.uint8)}, "a red circle moving left", meta)
    assert family.sample_problem(model, good) is None
    small = Sample("k", {"pixels": np.zeros((5, 16, 16, 3), np.uint8)}, "x", meta)
    assert "pixels [5, 16, 16, 3], the pyramid of hpdm-demo needs [5, 32, 32, 3]" in family.sample_problem(
        model, small
    )
    classes = model.replace(condition="class", num_classes=2, classes=("run", "swim"))
    assert family.sample_problem(classes, good) == (
        "caption 'a red circle moving left' is not a class of hpdm-demo (model.classes)"
    )
    example = family.example(classes, Sample("k", good.arrays, "swim", meta), [], 3)
    assert int(example["condition"]) in (1, 2)  # "swim" is class 1; the null class 2 one time in ten


def test_class_presets_train_without_a_text_tokenizer(tmp_path):
    """A class preset reads no captions as text (the family's reads_text): the trainer's start-up
    takes it without data.text_tokenizer and its loader builds class-labelled batches; the same
    run conditioned on text still stops naming data.text_tokenizer."""
    import argparse

    from test_hpdm_train import MODEL, ROOT, write_frame_shards

    from cogvideo.configio import ConfigError
    from cogvideo.family import get_family
    from pretrain.data import ShardLoader
    from pretrain.startup import no_text, preflight

    shards = write_frame_shards(tmp_path)
    classes = [f"clip {s} {i}" for s in range(4) for i in range(4)]  # write_frame_shards' captions
    common = [*MODEL, f"data.shards=[{','.join(shards)}]", f"checkpoint.dir={tmp_path / 'run'}"]
    as_classes = [
        "model.condition=class",
        f"model.num_classes={len(classes)}",
        f"model.classes=[{','.join(classes)}]",
    ]

    def start(*extra):
        return preflight(
            argparse.Namespace(
                config=str(ROOT / "configs/tiny_test.yaml"), overrides=[*common, *extra], resume=None
            ),
            1,
        )

    cfg, model_cfg, found, encode, _ = start(*as_classes)
    assert encode is no_text and not get_family("hpdm").reads_text(model_cfg)
    loader = ShardLoader(found, model_cfg, encode, cfg.data, micro_batch_size=4, seed=0)
    batch = next(iter(loader))
    for key, label in zip(batch.keys, batch.tensors["condition"].tolist()):  # key s{s}c{i}: "clip {s} {i}"
        caption = "clip " + " ".join(key[1:].split("c"))
        assert label in (classes.index(caption), len(classes))  # its class, or the null class
    with pytest.raises(ConfigError, match="data.text_tokenizer: required"):
        start()
