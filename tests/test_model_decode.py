"""Incremental decoding over the KV cache gives the full forward's logits, token by token."""
import pytest
import torch

from cogvideo.sequence import TokenMeta
from model_helpers import random_batch, random_model


@pytest.mark.parametrize("text_bias", [0.0, 1.4])
def test_stage1_token_by_token_equals_full(text_bias):
    model = random_model("tiny", num_layers=3)
    cfg = model.cfg
    tokens, _, _ = random_batch(cfg)
    T, n = cfg.text_length, cfg.tokens_per_frame
    with torch.no_grad():
        full = model(tokens, text_bias=text_bias)
        cache = model.new_cache()
        outs = [model.forward_chunk(tokens[:, :T], TokenMeta.text(cfg), cache, text_bias=text_bias)]
        # frame 0 in one parallel pass (a given first frame), the rest one token at a time
        outs.append(model.forward_chunk(tokens[:, T:T + n], TokenMeta.of_frame(cfg, 0), cache, text_bias=text_bias))
        for f in range(1, cfg.num_frames):
            for p in range(n):
                s = T + f * n + p
                outs.append(model.forward_chunk(tokens[:, s:s + 1], TokenMeta.of_frame(cfg, f, p, p + 1), cache,
                                                text_bias=text_bias))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_stage2_slot_order_equals_full():
    model = random_model("tiny-stage2", num_layers=3)
    cfg = model.cfg
    tokens, _, _ = random_batch(cfg)
    T, n = cfg.text_length, cfg.tokens_per_frame
    frame_slice = lambda f: slice(T + f * n, T + (f + 1) * n)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        text = model.forward_chunk(tokens[:, :T], TokenMeta.text(cfg), cache)
        torch.testing.assert_close(text, full[:, :T], atol=1e-5, rtol=1e-5)
        given = cfg.given_frames  # 0, 2, 4 in one parallel pass
        chunk = torch.cat([tokens[:, frame_slice(f)] for f in given], 1)
        out = model.forward_chunk(chunk, TokenMeta.cat([TokenMeta.of_frame(cfg, f) for f in given]), cache)
        torch.testing.assert_close(out, torch.cat([full[:, frame_slice(f)] for f in given], 1), atol=1e-5, rtol=1e-5)
        for f in (1, 3):  # then the new frames, one token at a time
            for p in range(n):
                s = T + f * n + p
                step = model.forward_chunk(tokens[:, s:s + 1], TokenMeta.of_frame(cfg, f, p, p + 1), cache)
                torch.testing.assert_close(step, full[:, s:s + 1], atol=1e-5, rtol=1e-5)


def test_backbone_only_cache_equals_temporal_off_forward():
    model = random_model("tiny")
    cfg = model.cfg
    tokens, _, _ = random_batch(cfg)
    L = cfg.text_length + cfg.tokens_per_frame
    with torch.no_grad():
        full = model(tokens[:, :L], temporal=False)
        cache = model.new_cache(temporal=False)
        outs = [model.forward_chunk(tokens[:, :cfg.text_length], TokenMeta.text(cfg), cache)]
        for p in range(cfg.tokens_per_frame):
            s = cfg.text_length + p
            outs.append(model.forward_chunk(tokens[:, s:s + 1], TokenMeta.of_frame(cfg, 0, p, p + 1), cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_order_errors():
    model = random_model("tiny")
    cfg = model.cfg
    tokens, _, _ = random_batch(cfg)
    cache = model.new_cache()
    with pytest.raises(ValueError, match="text"):
        model.forward_chunk(tokens[:, cfg.text_length:cfg.text_length + 1], TokenMeta.of_frame(cfg, 0, 0, 1), cache)
    with pytest.raises(ValueError, match="meta describes"):
        model.forward_chunk(tokens[:, :3], TokenMeta.text(cfg), cache)
