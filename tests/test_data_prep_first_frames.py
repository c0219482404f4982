"""cogvideo-reshard --first-frames: frame 0 of every stage-1 sample, as one-frame samples for the
first-frame model, dealt over the shards so every reader gets some; with --stills every later
frame too, as a still that the model reads with the caption alone."""

from __future__ import annotations

import numpy as np
import pytest
from webdataset.tariterators import tarfile_samples

from cogvideo.shards import ClipMeta, decode_sample, encode_sample
from data_prep import reshard
from data_prep.output import SHARD_DIR, PrepOutput


def prepared(root, stages=(1, 2, 1, 1, 2, 1, 1, 1, 1, 1)):
    out = PrepOutput(root, shard_samples=3, shard_bytes=2**20)
    frames = {}
    for i, stage in enumerate(stages):
        num = 5
        meta = ClipMeta(
            duration=float(1 + i % 3),  # the one-frame samples keep it
            fps=1.0,
            stage=stage,
            source=f"v{i}.mp4",
            clip_start=0.0,
            clip_end=4.0,
            num_frames=num,
        )
        frames[f"k{i}"] = np.arange(num * 16).reshape(num, 4, 4) + 1000 * i
        out.add_sample(
            encode_sample(f"k{i}", {"frames": frames[f"k{i}"]}, f"caption {i}", meta),
            {
                "key": f"k{i}",
                "source": f"v{i}.mp4",
                "clip": [0, 5],
                "window": [0, 4],
                "fps": 1.0,
                "stage": stage,
            },
        )
    out.commit()
    return frames, stages


def read(folder):
    tars = sorted((folder / SHARD_DIR).glob("*.tar"))
    return {tar.name: [decode_sample(raw) for raw in tarfile_samples([{"url": str(tar)}])] for tar in tars}


def test_first_frames_of_stage1_samples_dealt_round_robin(tmp_path, capsys):
    frames, stages = prepared(tmp_path / "prep")
    before = read(tmp_path / "prep")
    assert (
        reshard.main(
            [
                str(tmp_path / "prep"),
                "--divisible-by",
                "2",
                "--shards",
                "4",
                "--first-frames",
                str(tmp_path / "frame0"),
            ]
        )
        == 0
    )
    assert "8 one-frame samples" in capsys.readouterr().out
    shards = read(tmp_path / "frame0")
    assert len(shards) == 4
    stage1 = [f"k{i}" for i, s in enumerate(stages) if s == 1]
    for part, samples in enumerate(shards.values()):
        assert [s.key for s in samples] == stage1[part::4]
        for sample in samples:
            assert sample.meta.num_frames == 1 and sample.meta.stage == 1
            assert sample.meta.duration == float(1 + int(sample.key[1:]) % 3)
            assert np.array_equal(sample.arrays["frames"], frames[sample.key][:1])
            assert sample.caption == f"caption {sample.key[1:]}"
    after = read(tmp_path / "prep")
    assert {k: [s.key for s in v] for k, v in after.items()} == {
        k: [s.key for s in v] for k, v in before.items()
    }


def test_stills_add_every_later_frame_without_a_duration(tmp_path, capsys):
    frames, stages = prepared(tmp_path / "prep")
    args = [str(tmp_path / "prep"), "--divisible-by", "2", "--shards", "4", "--first-frames"]
    assert reshard.main([*args, str(tmp_path / "frame0"), "--stills"]) == 0
    assert "40 one-frame samples" in capsys.readouterr().out  # 8 stage-1 samples x 5 frames
    dealt = [s for shard in read(tmp_path / "frame0").values() for s in shard]
    by_key = {s.key: s for s in dealt}
    assert len(by_key) == 40
    for key in (f"k{i}" for i, s in enumerate(stages) if s == 1):
        first = by_key[key]
        assert first.meta.duration == float(1 + int(key[1:]) % 3)  # frame 0 keeps its clip's duration
        assert np.array_equal(first.arrays["frames"], frames[key][:1])
        for i in range(1, 5):
            still = by_key[f"{key}_still{i}"]
            assert still.meta.duration is None and still.meta.num_frames == 1
            assert np.array_equal(still.arrays["frames"], frames[key][i : i + 1])
            assert still.caption == first.caption
    assert all(len(shard) == 10 for shard in read(tmp_path / "frame0").values())
    # without --stills the same folder holds the first frames alone
    reshard.main([*args, str(tmp_path / "plain")])
    assert sorted(s.key for shard in read(tmp_path / "plain").values() for s in shard) == sorted(
        k for k, s in by_key.items() if s.meta.duration is not None
    )


def test_first_frames_refuse_what_cannot_be_done(tmp_path, capsys):
    prepared(tmp_path / "prep", stages=(2, 2, 2))
    with pytest.raises(SystemExit) as exit:
        reshard.main([str(tmp_path / "prep"), "--divisible-by", "1", "--first-frames", str(tmp_path / "f")])
    assert exit.value.code == 2 and "no stage-1 samples" in capsys.readouterr().err
    prepared(tmp_path / "few", stages=(1, 1))
    with pytest.raises(SystemExit):
        reshard.main([str(tmp_path / "few"), "--divisible-by", "4", "--first-frames", str(tmp_path / "g")])
    assert "cannot fill 4 shards" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        reshard.main([str(tmp_path / "few"), "--divisible-by", "1", "--stills"])
    assert exit.value.code == 2 and "--stills goes with --first-frames" in capsys.readouterr().err
