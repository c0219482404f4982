"""Worker of tests/test_scale_slice.py: the published stage shapes (full width, vocabulary,
sequence and windows; 2 of 48 layers) at TP=1 (one process, fp32) and at TP=8
(eight gloo processes under torchrun, DeepSpeed ZeRO-2, bf16 where this CPU has it).

    python tests/scale_slice.py released OUT [STAGE ...]    # weights as released: 150010 rows, TP=1
    cogvideo-convert reshard OUT/released_STAGE OUT/weights_STAGE --tp 8 --vocab-size 150016  # each stage
    python tests/scale_slice.py reference OUT [STAGE ...]   # TP=1 results from the padded weights
    torchrun --nproc-per-node 8 tests/scale_slice.py tp8 OUT [STAGE ...]

Every step writes into OUT; the test compares them. Each process keeps its own memory figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cogvideo import parallel  # noqa: E402
from cogvideo.family import build_model  # noqa: E402
from cogvideo.models.cogvideo.config import get_preset  # noqa: E402
from cogvideo.models.cogvideo.sequence import build_sequence  # noqa: E402
from cogvideo.vocab import VocabLayout  # noqa: E402

TP = 8
STAGES = ("stage1", "stage2")
LR, BETAS, EPS, DECAY = 1e-3, (0.9, 0.95), 1e-8, 1e-4
# icetk's 150010 ids split over no TP degree but 2, 5 and 10: the converter pads the released rows
# to a multiple of 128 (Megatron's make-vocab-size-divisible-by), 150016 = 128 x 1172.
PADDED_VOCAB = dataclasses.replace(VocabLayout.icetk(), vocab_size=150016)
SHARD_BYTES = 256 << 20  # the checkpoint tools' output shards on the slice


def slice_config(stage: str, num_layers: int = 2):
    """Dropout off: the two runs are compared number for number (dropout under TP: docs/cuda-paths.md)."""
    return (
        get_preset(f"cogvideo-{stage}")
        .replace(num_layers=num_layers, vocab=PADDED_VOCAB, hidden_dropout=0.0, attention_dropout=0.0)
        .validate(TP)
    )


def released_config(stage: str):
    """The slice with the released vocabulary rows (icetk's 150010), as the SAT checkpoints hold them."""
    return slice_config(stage).replace(vocab=VocabLayout.icetk()).validate()


def batch(cfg):
    """One sample: a 9-token caption (left-padded to 64) and 5 frames of 20 x 20 image ids."""
    g = torch.Generator().manual_seed(7)
    v = cfg.vocab
    text = torch.randint(v.text_offset, v.text_offset + v.num_text_tokens, (9,), generator=g)
    frames = torch.randint(
        0, v.num_image_tokens, (cfg.num_frames, cfg.frame_tokens, cfg.frame_tokens), generator=g
    )
    return [x[None] for x in build_sequence(cfg, text, frames)]


LOGIT_POSITIONS = slice(64, None, 129)  # 16 frame positions whose logits the test compares


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trainable_grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- TP=1 ---------------------------------------------------------------------------------
def released(out: Path, stages: list[str]) -> None:
    """The slice's weights as released (150010 vocabulary rows, TP=1), for the converter to pad."""
    from cogvideo.checkpoint import save_model_checkpoint

    torch.set_num_threads(2)
    for stage in stages:
        cfg = released_config(stage)
        torch.manual_seed(0)
        model = build_model(cfg)
        with torch.no_grad():  # non-trivial gates and biases, so their gradients mean something
            for name, p in model.named_parameters():
                if name.endswith(("bias", "temporal_gate")):
                    p.normal_(std=0.1)
        save_model_checkpoint(out / f"released_{stage}", model.state_dict(), cfg, max_shard_bytes=SHARD_BYTES)
        del model


def reference(out: Path, stages: list[str]) -> None:
    """One fp32 process on the padded weights (weights_STAGE, stored at TP=8 by the converter)."""
    from cogvideo.checkpoint import load_model_state
    from pretrain.optim import param_groups

    torch.set_num_threads(2)
    for stage in stages:
        cfg = slice_config(stage)
        model = build_model(cfg, device="meta", init_weights=False)
        model.load_state_dict(load_model_state(out / f"weights_{stage}"), assign=True)  # merged to TP=1
        tokens, targets, mask = batch(cfg)
        logits = model(tokens)
        kept = logits[0, LOGIT_POSITIONS].detach().clone()
        loss1 = model.loss(logits, targets, mask)
        del logits
        loss1.backward()
        grads = trainable_grads(model)
        optimizer = torch.optim.AdamW(param_groups(model, DECAY), lr=LR, betas=BETAS, eps=EPS)
        optimizer.step()
        del optimizer
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            loss2 = model.loss(model(tokens), targets, mask)
        del model
        result = {
            "loss": [loss1.item(), loss2.item()],
            "logits": kept,
            "grads": grads,
            "peak_rss": peak_rss_bytes(),
        }
        torch.save(result, out / f"tp1_{stage}.pt")


# ---- TP=8 ---------------------------------------------------------------------------------
def train_config():
    from pretrain.config import TrainConfig

    cfg = TrainConfig()
    cfg.parallel.zero_stage = 2
    cfg.parallel.precision = os.environ.get("SLICE_PRECISION", "bf16")
    cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay = LR, BETAS, EPS, DECAY
    cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.training.max_steps = 0, 0.0, 10
    return cfg


def tp8_stage(stage: str, out: Path, rank: int) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from benchmarks.memtrack import LiveTensorBytes
    from cogvideo.checkpoint import load_model_state
    from pretrain.optim import deepspeed_config, lr_scheduler, param_groups

    cfg, train = slice_config(stage), train_config()
    model = build_model(cfg, device="cpu", init_weights=False)
    model.load_state_dict(load_model_state(out / f"weights_{stage}", rank, TP))
    tokens, targets, mask = batch(cfg)
    with LiveTensorBytes() as mem:
        mem.track_all(model.parameters())
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, DECAY),
            config=deepspeed_config(train, 1),
            mpu=parallel.mpu(),
            lr_scheduler=lr_scheduler(train),
        )
        losses = []
        for step in range(2):  # memory: the second step, when ZeRO's buffers exist from the start
            mem.reset_peak()
            logits = engine(tokens)
            loss = engine.module.loss(logits, targets, mask)
            if step == 0:  # this rank's vocabulary shard of the logits at the compared positions
                torch.save(
                    logits[0, LOGIT_POSITIONS].float().clone(), out / f"tp8_{stage}_logits_rank{rank}.pt"
                )
            del logits
            engine.backward(loss)
            if step == 0:
                grads = {
                    n: safe_get_full_grad(p).float().clone()
                    for n, p in engine.module.named_parameters()
                    if p.requires_grad
                }
                torch.save(grads, out / f"tp8_{stage}_grads_rank{rank}.pt")
                del grads
            engine.step()
            losses.append(loss.item())
        step_peak = mem.peak
    if stage == "stage1":  # for the checkpoint tools: what ZeRO saves, and the fp32 master it must give back
        engine.save_checkpoint(str(out / "deepspeed"), tag="step2")
        master = {
            n: safe_get_full_fp32_param(p).clone()
            for n, p in engine.module.named_parameters()
            if p.requires_grad
        }
        torch.save(master, out / f"tp8_{stage}_master_rank{rank}.pt")
    return {"loss": losses, "live_peak": step_peak, "dtype": str(next(engine.module.parameters()).dtype)}


def meta_shapes(stage: str) -> dict:
    """This rank's parameter shapes of the full 48-layer preset, built on the meta device."""
    model = build_model(slice_config(stage, num_layers=48), device="meta", init_weights=False)
    return {n: list(p.shape) for n, p in model.named_parameters()}


def tp8(out: Path, stages: list[str]) -> None:
    torch.set_num_threads(1)
    parallel.init_distributed(TP, backend="gloo")
    rank = parallel.tp_rank()
    for stage in stages:
        report = {**tp8_stage(stage, out, rank), "meta": meta_shapes(stage), "peak_rss": peak_rss_bytes()}
        (out / f"tp8_{stage}_rank{rank}.json").write_text(json.dumps(report))
    parallel.destroy()


if __name__ == "__main__":
    {"released": released, "reference": reference, "tp8": tp8}[sys.argv[1]](
        Path(sys.argv[2]), sys.argv[3:] or list(STAGES)
    )
