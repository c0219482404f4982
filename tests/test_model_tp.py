"""Tensor parallelism: TP=2 over two gloo processes equals TP=1 on the same weights
(logits, loss and every gradient, fp32)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cogvideo import parallel
from cogvideo.config import get_preset
from cogvideo.model import CogVideoModel
from cogvideo.sequence import build_sequence

pytestmark = pytest.mark.slow


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for text_len in (3, cfg.text_length):
        text = torch.randint(cfg.vocab.text_offset, cfg.vocab.text_offset + cfg.vocab.num_text_tokens, (text_len,), generator=g)
        frames = torch.randint(0, cfg.vocab.num_image_tokens, (cfg.num_frames, cfg.frame_tokens, cfg.frame_tokens), generator=g)
        samples.append(build_sequence(cfg, text, frames))
    return [torch.stack(x) for x in zip(*samples)]


def _configs():
    return [get_preset(name).replace(num_layers=2, train_backbone=True) for name in ("tiny", "tiny-stage2")]


def _run(cfg, state, text_bias=0.0):
    model = CogVideoModel(cfg)
    model.load_state_dict(state)
    tokens, targets, mask = _batch(cfg)
    logits = model(tokens, text_bias=text_bias)
    loss = model.loss(logits, targets, mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _worker(rank, port, states, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    parallel.init_distributed(tensor_parallel=2, backend="gloo")
    results = []
    for cfg, full in zip(_configs(), states):
        torch.manual_seed(1)  # megatron's CPU init draws from the global RNG
        logits, loss, grads = _run(cfg, parallel.shard_state_dict(full, rank, 2), text_bias=1.4)
        gathered = [torch.empty_like(logits) for _ in range(2)]
        torch.distributed.all_gather(gathered, logits.contiguous())
        all_grads = [None, None]
        torch.distributed.all_gather_object(all_grads, grads)
        results.append((torch.cat(gathered, -1), loss, parallel.merge_state_dicts(all_grads)))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "tp2.pt"))
    parallel.destroy()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_matches_tp1(tmp_path):
    states = []
    for cfg in _configs():
        torch.manual_seed(0)
        model = CogVideoModel(cfg)
        with torch.no_grad():  # make the gates and biases non-trivial so their grads mean something
            for name, p in model.named_parameters():
                if name.endswith("bias") or name.endswith("temporal_gate"):
                    p.normal_(std=0.1)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    mp.spawn(_worker, args=(_free_port(), states, str(tmp_path)), nprocs=2, join=True)
    tp2 = torch.load(tmp_path / "tp2.pt", weights_only=True)
    for cfg, full, (logits2, loss2, grads2) in zip(_configs(), states, tp2):
        logits1, loss1, grads1 = _run(cfg, full, text_bias=1.4)
        torch.testing.assert_close(logits2, logits1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss2, loss1, atol=1e-5, rtol=1e-5)
        assert set(grads2) == set(grads1)
        for name in grads1:
            torch.testing.assert_close(grads2[name], grads1[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{cfg.stage} {name}: {m}")
