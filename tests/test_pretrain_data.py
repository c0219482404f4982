"""The shard loader: DP split, seeded shuffle, stage filter, exact positions, bad shards."""

from __future__ import annotations

import itertools
import logging
import threading
import time

import numpy as np
import pytest
import torch
import webdataset as wds

from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.sequence import build_sequence
from cogvideo.shards import ClipMeta, encode_sample
from cogvideo.text_format import TextFormat
from pretrain.config import DataConfig
from pretrain.data import (
    DataError,
    LoaderPosition,
    ShardLoader,
    expand_shards,
    prefetched,
    rank_shards,
    shuffled,
)

CFG = get_preset("tiny")


def encode_text(text: str) -> list[int]:
    """A stand-in text tokenizer: one id per character, inside the text range."""
    return [CFG.vocab.text_id(ord(c) % CFG.vocab.num_text_tokens) for c in text]


def write_shards(root, num_shards=4, per_shard=6, stage2_every=3, seed=0, codes=None) -> list[str]:
    """Shards of uniformly random frames over the first `codes` image codes (default: all of them)."""
    rng = np.random.default_rng(seed)
    paths = []
    side = CFG.frame_tokens
    for s in range(num_shards):
        path = str(root / f"shard-{s:03d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(per_shard):
                stage = 2 if stage2_every and i % stage2_every == stage2_every - 1 else 1
                frames = rng.integers(0, codes or CFG.vocab.num_image_tokens, (CFG.num_frames, side, side))
                meta = ClipMeta(
                    duration=4.0 / stage,
                    fps=stage,
                    stage=stage,
                    source=f"v{s}",
                    clip_start=i,
                    clip_end=i + 4,
                    num_frames=CFG.num_frames,
                )
                sink.write(encode_sample(f"s{s}_{i}", {"frames": frames}, f"clip {s} {i}", meta))
        paths.append(path)
    return paths


def write_caption_tokenizer(root) -> str:
    """A text tokenizer (60 pieces) fit on the captions `write_shards` writes (its defaults); its path."""
    from cogvideo.tokenizers.text import train_text_tokenizer

    captions = [f"clip {s} {i}" for s in range(4) for i in range(6)] * 4
    return str(train_text_tokenizer(captions, root / "text", 60, byte_fallback=False, preset="tiny"))


def make_loader(shards, cfg=CFG, position: LoaderPosition | None = None, **kw) -> ShardLoader:
    """`kw`: DataConfig fields and the loader's own arguments (micro_batch_size, seed, DP rank/size)."""
    data = dict(stage=1, shuffle_buffer=5, prefetch_batches=2) | kw
    own = {k: data.pop(k) for k in ("micro_batch_size", "seed", "dp_rank", "dp_size") if k in data}
    loader = ShardLoader(
        shards, cfg, encode_text, DataConfig(**data), **({"micro_batch_size": 2, "seed": 7} | own)
    )
    if position is not None:
        loader.load_state_dict(position.to_dict())
    return loader


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def stage1_keys(shards) -> set[str]:
    return {f"s{s}_{i}" for s in range(len(shards)) for i in range(6) if i % 3 != 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def test_dp_ranks_split_an_epoch_without_loss_or_repeat(shards):
    per_rank = []
    for rank in range(2):
        loader = make_loader(shards, micro_batch_size=1, dp_rank=rank, dp_size=2)
        epoch = list(itertools.takewhile(lambda s: loader.position.epoch == 0, loader.samples()))
        per_rank.append([s.key for s in epoch])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(stage1_keys(shards))
    # the same DP rank (e.g. a TP peer) sees the very same stream
    again = make_loader(shards, micro_batch_size=1, dp_rank=0, dp_size=2)
    assert [s.key for s in itertools.islice(again.samples(), len(per_rank[0]))] == per_rank[0]


def test_batches_match_build_sequence_and_stage_filter(shards):
    loader = make_loader(shards, stage=2, shuffle_buffer=0)
    batch = next(iter(loader))
    assert all(int(k.split("_")[1]) % 3 == 2 for k in keys_of([batch]))
    assert (
        batch.tensors["tokens"].shape == (2, CFG.seq_length)
        and batch.tensors["loss_mask"].dtype == torch.bool
    )
    sample = next(make_loader(shards, stage=2, shuffle_buffer=0).samples())
    text = TextFormat().text(sample.caption, sample.meta.duration)
    assert text == f"{sample.meta.duration:.1f}秒<n>{sample.caption}"  # the published prefix
    tokens, targets, mask = build_sequence(CFG, encode_text(text)[: CFG.text_length], sample.arrays["frames"])
    assert torch.equal(batch.tensors["tokens"][0], tokens) and torch.equal(
        batch.tensors["targets"][0], targets
    )
    assert torch.equal(batch.tensors["loss_mask"][0], mask)


def test_shuffle_is_seeded_and_changes_per_epoch(shards):
    def order(seed, n=16):
        return [s.key for s in itertools.islice(make_loader(shards, seed=seed).samples(), n)]

    assert order(7) == order(7)
    assert order(7) != order(8)
    epoch_len = len(stage1_keys(shards))
    both = order(7, 2 * epoch_len)
    assert sorted(both[:epoch_len]) == sorted(both[epoch_len:]) and both[:epoch_len] != both[epoch_len:]
    assert list(shuffled(iter(range(10)), 0, None)) == list(range(10))


def test_rank_shards_deals_a_permutation():
    shards = [f"x{i}" for i in range(7)]
    dealt = [rank_shards(shards, 3, 1, r, 3) for r in range(3)]
    assert sorted(sum(dealt, [])) == sorted(shards)
    assert rank_shards(shards, 3, 1, 0, 3) != rank_shards(shards, 3, 2, 0, 3)


def test_resume_from_a_saved_position_is_exact(shards):
    loader = make_loader(shards, dp_rank=1, dp_size=2)
    stream = iter(loader)
    first = [next(stream) for _ in range(7)]  # crosses an epoch boundary (4 samples/epoch/rank)
    rest = [next(stream) for _ in range(5)]
    saved = LoaderPosition.from_dict(first[-1].position.to_dict())
    assert saved.epoch >= 1
    resumed = iter(make_loader(shards, dp_rank=1, dp_size=2, position=saved))
    again = [next(resumed) for _ in range(5)]
    assert keys_of(again) == keys_of(rest)
    assert all(torch.equal(a.tensors["tokens"], b.tensors["tokens"]) for a, b in zip(again, rest))


def test_corrupt_and_truncated_shards_are_skipped_and_counted(tmp_path, caplog):
    shards = write_shards(tmp_path, num_shards=3)
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[: len(data) // 2 + 100])  # truncated mid-member
    bad = tmp_path / "shard-zzz.tar"
    bad.write_bytes(b"this is not a tar file" * 50)
    paths = expand_shards([str(tmp_path / "shard-{000..002}.tar"), str(bad)])
    loader = make_loader(paths, micro_batch_size=1, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        epoch = list(itertools.takewhile(lambda s: loader.position.epoch == 0, loader.samples()))
    assert loader.position.bad_shards == 2
    for path, problem in ((shards[1], "truncated"), (str(bad), "not a tar archive")):
        assert any(path in r.getMessage() and problem in r.getMessage() for r in caplog.records), path
    keys = {s.key for s in epoch}
    assert {k for k in stage1_keys(shards) if not k.startswith("s1_")} <= keys  # intact shards complete
    assert not any(k.startswith("s1_") for k in keys)  # a truncated shard is skipped whole


@pytest.mark.parametrize("sees_the_size", [True, False])
@pytest.mark.parametrize("inside_a_sample", [False, True])
def test_a_shard_cut_while_read_is_counted_and_named(
    tmp_path, caplog, monkeypatch, sees_the_size, inside_a_sample
):
    """Cut on a member boundary under a running loader, a shard ends like a whole one to a tar
    reader: the loader tells them apart by the shard's size. Blinded to the size (planted), the
    rest of the shard is lost without a word, as it was; either way the next epoch finds the
    shard bad when it opens it. Cut inside a sample's array, the tar reader fails by itself."""
    import os
    import tarfile

    (path,) = write_shards(tmp_path, num_shards=1, per_shard=40, stage2_every=0)
    members = tarfile.open(path).getmembers()  # 3 per sample: caption, frames, meta
    # sample 30's first header, or 100 bytes into its frames: samples 0..29 stay either way
    cut = members[3 * 30 + 1].offset_data + 100 if inside_a_sample else members[3 * 30].offset
    whole = os.path.getsize(path)
    if not sees_the_size:
        first_seen = {}
        monkeypatch.setattr(
            "pretrain.data.os.fstat", lambda fd, real=os.fstat: first_seen.setdefault(fd, real(fd))
        )
    loader = make_loader([path], micro_batch_size=1, shuffle_buffer=0, prefetch_batches=0)
    samples, seen = loader.samples(), []
    with caplog.at_level(logging.WARNING, logger="pretrain.data"), pytest.raises(DataError):
        for sample in samples:
            seen.append(sample.key)
            if len(seen) == 3:  # the loader is inside the shard, well before the cut
                os.truncate(path, cut)
    assert seen == [f"s0_{i}" for i in range(30)]
    named = [r.getMessage() for r in caplog.records if path in r.getMessage()]
    if inside_a_sample:
        assert loader.position.bad_shards == 2 and len(named) == 2
        assert "unexpected end of data" in named[0] and "truncated" in named[1]
    elif sees_the_size:
        assert loader.position.bad_shards == 2 and len(named) == 2
        assert f"cut from {whole} to {cut} bytes while it was read" in named[0] and "truncated" in named[1]
    else:
        assert loader.position.bad_shards == 1 and len(named) == 1 and "cut from" not in named[0]


def test_malformed_samples_are_skipped_and_counted(tmp_path, caplog):
    path = str(tmp_path / "mixed.tar")
    meta = ClipMeta(
        duration=4.0, fps=1, stage=1, source="v", clip_start=0, clip_end=4, num_frames=CFG.num_frames
    )
    good = np.zeros((CFG.num_frames, CFG.frame_tokens, CFG.frame_tokens), dtype=np.int64)
    with wds.TarWriter(path) as sink:
        sink.write(encode_sample("ok", {"frames": good}, "fine", meta))
        sink.write(
            encode_sample(
                "badcode", {"frames": good + CFG.vocab.num_image_tokens}, "codes out of range", meta
            )
        )
        sink.write(encode_sample("badshape", {"frames": good[:, :2]}, "wrong size", meta))
    loader = make_loader([path], micro_batch_size=1)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        assert next(iter(loader)).keys == ["ok"]
    assert loader.state_dict()["bad_samples"] == 2
    assert any("badshape" in r.getMessage() for r in caplog.records)


def test_errors_name_the_problem(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_shards([str(tmp_path / "nothing-here-*.tar")])
    with pytest.raises(DataError, match="3 data-parallel"):
        make_loader(shards[:2], dp_size=3)


def test_prefetch_keeps_order_and_raises_errors():
    assert list(prefetched(iter(range(20)), 3)) == list(range(20))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(broken(), 2))


def test_closing_the_prefetched_stream_stops_its_thread():
    """A producer left running at exit can be inside torch when the interpreter finalises and
    abort the process (a finished training run exited with SIGABRT)."""

    def endless():
        while True:
            time.sleep(0.05)
            yield torch.zeros(2)

    before = set(threading.enumerate())
    stream = prefetched(endless(), 2)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "shard-loader" and t not in before]


def test_resume_keeps_bad_counts_exact_at_every_cut(tmp_path, caplog):
    shards = write_shards(tmp_path, num_shards=3)
    data = open(shards[2], "rb").read()
    open(shards[2], "wb").write(data[:3000])
    (tmp_path / "shard-zzz.tar").write_bytes(b"garbage" * 100)
    paths = expand_shards([str(tmp_path / "shard-*.tar")])
    stream = iter(make_loader(paths, micro_batch_size=1, shuffle_buffer=3))
    run = [next(stream) for _ in range(20)]  # 8 good samples per epoch: crosses two epoch ends
    assert run[-1].position.bad_shards == 2 * 3  # two bad shards, read in each of 3 epochs
    for cut in (0, 3, 7, 8, 15):  # 7 and 15 end an epoch
        resumed = iter(make_loader(paths, micro_batch_size=1, shuffle_buffer=3, position=run[cut].position))
        for expected in run[cut + 1 :]:
            got = next(resumed)
            assert got.keys == expected.keys and got.position == expected.position, (cut, expected.position)


@pytest.mark.parametrize("uncond_prefix", [True, False])
def test_caption_dropout_is_seeded_per_sample_and_epoch(shards, uncond_prefix):
    cfg = CFG.replace(text_length=16)
    plain = make_loader(shards, cfg, micro_batch_size=1, shuffle_buffer=0)
    loader = make_loader(
        shards, cfg, micro_batch_size=1, shuffle_buffer=0, caption_dropout=0.5, uncond_prefix=uncond_prefix
    )
    samples = list(itertools.islice(loader.samples(), 16))
    dropped = []
    for sample in samples:
        # the release's guidance text: "{duration}秒<n>视频"; without the prefix: "视频"
        uncond = f"{sample.meta.duration:.1f}秒<n>视频" if uncond_prefix else "视频"
        expected_uncond = torch.tensor(encode_text(uncond))
        tokens = loader.to_example(sample)["tokens"]
        text = tokens[: cfg.text_length]
        n = len(expected_uncond)
        is_uncond = torch.equal(text[-n:], expected_uncond) and bool((text[:-n] == cfg.vocab.pad_id).all())
        assert is_uncond == loader._dropped(sample.key)
        if not is_uncond:
            assert torch.equal(
                tokens, plain.to_example(sample)["tokens"]
            )  # conditional samples are untouched
        dropped.append(is_uncond)
    assert 2 <= sum(dropped) <= 14  # about half of 16
    again = make_loader(
        shards, cfg, micro_batch_size=1, shuffle_buffer=0, caption_dropout=0.5, uncond_prefix=uncond_prefix
    )
    assert [again._dropped(s.key) for s in samples] == [loader._dropped(s.key) for s in samples]


def test_a_still_reads_the_caption_alone_and_a_clip_its_duration_prefix(tmp_path):
    """A one-frame sample of a clip (cogvideo-reshard --first-frames) reads "{duration}秒<n>caption";
    a still (--stills, meta.duration None) the caption alone; dropped, "视频" with the same prefix or none."""
    cfg = CFG.replace(text_length=16, num_frames=1)
    side = CFG.frame_tokens
    path = str(tmp_path / "one-frame.tar")
    with wds.TarWriter(path) as sink:
        for i, duration in enumerate([2.0, None] * 8):
            meta = ClipMeta(duration, 1.0, 1, "v", 0.0, 2.0, 1)
            sink.write(encode_sample(f"f{i}", {"frames": np.zeros((1, side, side), int)}, "a clip", meta))
    loader = make_loader([path], cfg, micro_batch_size=1, shuffle_buffer=0, caption_dropout=0.5)
    seen = set()
    for sample in itertools.islice(loader.samples(), 16):
        dropped = loader._dropped(sample.key)
        caption = "视频" if dropped else "a clip"
        text = caption if sample.meta.duration is None else f"2.0秒<n>{caption}"
        expected = torch.tensor(encode_text(text))
        tokens = loader.to_example(sample)["tokens"][: cfg.text_length]
        assert torch.equal(tokens[-len(expected) :], expected), (sample.key, text)
        assert bool((tokens[: -len(expected)] == cfg.vocab.pad_id).all())
        seen.add((sample.meta.duration is None, dropped))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}


def test_text_truncation_is_reported_once(shards, caplog):
    loader = make_loader(shards)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        list(itertools.islice(iter(loader), 3))
    warnings = [r for r in caplog.records if "text_length=8" in r.getMessage()]
    assert len(warnings) == 1


def test_state_dict_is_the_position_handed_out_not_the_read_ahead(shards):
    """Stateful: with batches prepared ahead by the prefetch thread, state_dict() is the position
    after the last batch the caller took, and a loader restored from it continues exactly."""
    loader = make_loader(shards, prefetch_batches=3, dp_rank=0, dp_size=2)
    stream = iter(loader)
    taken = [next(stream) for _ in range(3)]
    state = loader.state_dict()
    assert state == taken[-1].position.to_dict()
    rest = [next(stream) for _ in range(4)]
    resumed = make_loader(shards, prefetch_batches=3, dp_rank=0, dp_size=2, position=LoaderPosition(**state))
    again = iter(resumed)
    assert keys_of(next(again) for _ in range(4)) == keys_of(rest)
