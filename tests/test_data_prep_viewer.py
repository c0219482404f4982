"""Data preparation sees each video as a player shows it: rotation (display matrix, legacy tag),
variable frame rate (frames chosen by presentation time), sample aspect ratio, colour range and
matrix, interlacing, several video streams; odd inputs get the right reason. Each case is a file
the test writes, and the decoded frames are compared with the pixels a viewer would see."""

import json
import struct
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from cogvideo.models.cogvideo.config import get_preset
from cogvideo.shards import ClipMeta, encode_sample
from cogvideo.video_io import square_frames
from data_prep import reshard
from data_prep.config import PrepConfig
from data_prep.inputs import Rejected
from data_prep.output import PrepOutput
from data_prep.stages import extract_samples
from data_prep.video import iter_clips, probe

MS = Fraction(1, 1000)


def write(path, frames, fps=8, fmt="mp4", pts=None, pix_fmt="yuv444p", setup=lambda stream: None, **options):
    """Lossless H.264 of `frames` (RGB arrays or ready VideoFrames), optionally at `pts` ms."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "0", **options})
        height, width = (
            (frames[0].height, frames[0].width)
            if isinstance(frames[0], av.VideoFrame)
            else frames[0].shape[:2]
        )
        stream.pix_fmt, stream.width, stream.height = pix_fmt, width, height
        if pts is not None:
            stream.codec_context.time_base = MS
        setup(stream)
        for i, image in enumerate(frames):
            frame = (
                image
                if isinstance(image, av.VideoFrame)
                else av.VideoFrame.from_ndarray(image, format="rgb24")
            )
            if pts is not None:
                frame.pts, frame.time_base = pts[i], MS
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def gradient(height, width):
    """Smooth and asymmetric: red grows to the right, green downwards."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), np.full_like(xs, 90)], -1).astype(
        np.uint8
    )


def viewed(image, size):
    """Centre square crop, BOX resize with PIL: the reference for a frame as prepared."""
    h, w = image.shape[:2]
    side = min(h, w)
    crop = image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BOX)).astype(int)


def clips(path, size=16, cfg=PrepConfig()):
    info = probe(path, cfg)
    return info, list(iter_clips(path, info, cfg, size))


def tkhd_matrix(path):
    """The QuickTime track matrix [a b u; c d v; x y w] as stored in the file's `tkhd` box."""
    data = open(path, "rb").read()
    at = data.index(b"tkhd")
    version = data[at + 4]
    offset = at + 8 + (32 if version == 1 else 20) + 16  # times, track id, duration; layer, volume
    return np.array(struct.unpack(">9i", data[offset : offset + 36]), np.float64) / 65536


def shown(image, matrix):
    """QuickTime's rule: a pixel (x, y) goes to (a x + c y, b x + d y) on screen (y down)."""
    a, b, _, c, d = matrix[:5]
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    x_to, y_to = np.rint(a * xs + c * ys).astype(int), np.rint(b * xs + d * ys).astype(int)
    x_to, y_to = x_to - x_to.min(), y_to - y_to.min()
    out = np.zeros((y_to.max() + 1, x_to.max() + 1, 3), np.uint8)
    out[y_to, x_to] = image[ys, xs]
    return out


@pytest.mark.parametrize(
    "clockwise,mirrored", [(90, False), (180, False), (270, False), (90, True), (0, True)]
)
def test_display_matrix_rotation_is_applied(tmp_path, clockwise, mirrored):
    image = gradient(32, 48)
    path = write(
        tmp_path / "rotated.mp4",
        [image] * 3,
        setup=lambda s: s.set_display_rotation(-clockwise, hflip=mirrored),
    )
    matrix = tkhd_matrix(path)
    assert not np.allclose(matrix[[0, 1, 3, 4]], [1, 0, 0, 1])  # the container itself carries the rotation
    info, (clip,) = clips(path)
    assert info.properties["mirrored"] == mirrored
    if not mirrored:
        assert info.properties["rotation"] == clockwise
    expected = viewed(shown(image, matrix), 16)
    assert np.abs(clip.frames.astype(int) - expected).max() <= 8
    assert np.abs(viewed(image, 16) - expected).max() > 60  # not the unrotated picture


def test_legacy_rotate_tag_is_applied(tmp_path):
    image = gradient(32, 48)
    path = write(
        tmp_path / "tagged.mkv", [image] * 3, fmt="matroska", setup=lambda s: s.metadata.update(rotate="90")
    )
    info, (clip,) = clips(path)
    assert info.properties["rotation"] == 90
    assert np.abs(clip.frames.astype(int) - viewed(np.rot90(image, -1), 16)).max() <= 8


def numbered(count, size=32):
    """Frame i is a flat grey 3 * i + 8: the decoded level says which frame was picked."""
    return [np.full((size, size, 3), 3 * i + 8, np.uint8) for i in range(count)]


def picked_frames(frames):
    return np.rint((frames.reshape(len(frames), -1).mean(1) - 8) / 3).astype(int)


def samples_of(path, cfg=PrepConfig(), model=get_preset("tiny")):  # 16 px frames, 5 per sample
    row = {"entry": path, "path": path, "caption": "a video", "sha256": "0" * 64}
    rows = extract_samples(row, cfg, model)
    records = [json.loads(r["record"]) for r in rows]
    samples = [
        (rec, np.frombuffer(r["pixels"], np.uint8).reshape(5, 16, 16, 3))
        for r, rec in zip(rows, records)
        if r["kind"] == "sample"
    ]
    return samples, records[-1]


def test_variable_frame_rate_is_sampled_at_true_times(tmp_path):
    # a phone's bursts: 16 ms and 250 ms intervals in random order
    intervals = np.where(np.random.default_rng(1).random(40) < 0.5, 16, 250)
    pts = np.concatenate([[0], np.cumsum(intervals)]).tolist()
    path = write(tmp_path / "vfr.mp4", numbered(len(pts)), pts=pts, bframes="0")
    samples, record = samples_of(path)
    assert record["status"] == "used" and record["video"]["vfr"] is True
    times = np.asarray(pts) / 1000
    assert {(rec["meta"]["stage"], rec["meta"]["fps"]) for rec, _ in samples} == {
        (1, 1.0),
        (2, 2.0),
        (2, 4.0),
    }  # 8 fps would repeat frames across the 250 ms gaps
    for rec, frames in samples:
        meta = rec["meta"]
        targets = meta["clip_start"] + np.arange(5) / meta["fps"]
        nearest = [int(np.argmin(np.abs(times - t) - 1e-9 * np.arange(len(times)))) for t in targets]
        assert picked_frames(frames).tolist() == nearest
        assert np.all(np.abs(times[nearest] - targets) <= 0.125 + 1e-9)
        assert rec["video"]["vfr"] is True


def test_sparse_but_complete_avi_is_not_truncated(tmp_path):
    """Issue 14: 68 packets whose timestamps run to frame 443 at 15 fps (AVI lists 444 frames)."""
    pts = [round(k * 443 / 67) for k in range(68)]
    path = str(tmp_path / "sparse.avi")
    with av.open(path, "w", format="avi") as container:
        stream = container.add_stream("rawvideo", rate=15)
        stream.pix_fmt, stream.width, stream.height = "bgr24", 32, 32  # levels exact
        for image, t in zip(numbered(68), pts):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 15)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(path) as container:
        assert container.streams.video[0].frames == 444
    info = probe(path, PrepConfig())
    assert info.num_frames == 68 and info.seconds == pytest.approx(444 / 15, abs=0.05)
    samples, record = samples_of(path)
    assert record["status"] == "used" and samples
    times = np.asarray(pts) / 15
    for rec, frames in samples:
        targets = rec["meta"]["clip_start"] + np.arange(5) / rec["meta"]["fps"]
        assert picked_frames(frames).tolist() == [int(np.argmin(np.abs(times - t))) for t in targets]


def test_broken_timestamps_are_rejected_with_the_numbers(tmp_path):
    gap = write(
        tmp_path / "gap.mp4",
        numbered(12),
        pts=[125 * k + (6000 if k > 5 else 0) for k in range(12)],
        bframes="0",
    )
    with pytest.raises(
        Rejected, match=r"broken_timestamps: .*no frame for 6\.125 s \(from 0\.625 s to 6\.750 s\)"
    ):
        probe(gap, PrepConfig())
    repeated = write(
        tmp_path / "repeated.mkv", numbered(6), fmt="matroska", pts=[0, 125, 250, 250, 375, 500], bframes="0"
    )
    with pytest.raises(
        Rejected,
        match=r"broken_timestamps: .*1 frame\(s\) repeat another's timestamp "
        r"\(first at 0\.250",
    ):
        probe(repeated, PrepConfig())


def test_anamorphic_pixels_are_cropped_square_on_screen_in_prep_and_in_the_tokenizer_fit(tmp_path):
    screen = gradient(48, 96)  # what a player shows: 96 x 48
    coded = np.asarray(Image.fromarray(screen).resize((48, 48), Image.BOX))  # stored 48 x 48, pixels 2:1
    path = write(
        tmp_path / "anamorphic.mp4",
        [coded] * 3,
        setup=lambda s: setattr(s.codec_context, "sample_aspect_ratio", Fraction(2, 1)),
    )
    info, (clip,) = clips(path)
    assert info.properties["sar"] == "2:1"
    expected = viewed(screen, 16)
    assert np.abs(clip.frames.astype(int) - expected).max() <= 10
    assert np.abs(viewed(coded, 16) - expected).max() > 60  # the squashed whole frame is not what is shown
    # the image tokenizer's fit reads what prep tokenizes: the same filters, the same bytes
    np.testing.assert_array_equal(square_frames(path, 16), clip.frames)


def yuv_frame(y, u, v, colour_range, colorspace, size=16):
    frame = av.VideoFrame(size, size, "yuv444p")
    for plane, value in zip(frame.planes, (y, u, v)):
        plane.update(np.full((size, plane.line_size), value, np.uint8).tobytes())
    frame.color_range, frame.colorspace = colour_range, colorspace
    return frame


def rgb_reference(y, u, v, limited, kr, kb):
    """YCbCr -> R'G'B' from the matrix coefficients (ITU-R BT.601 / BT.709), in float64."""
    if limited:
        luma, cb, cr = (y - 16) / 219, (u - 128) / 224, (v - 128) / 224
    else:
        luma, cb, cr = y / 255, (u - 128) / 255, (v - 128) / 255
    r, b = luma + 2 * (1 - kr) * cr, luma + 2 * (1 - kb) * cb
    g = (luma - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.array([r, g, b]) * 255, 0, 255)


@pytest.mark.parametrize(
    "colour_range,colorspace,names,kr,kb",
    [
        (1, 1, ("limited", "bt709"), 0.2126, 0.0722),
        (2, 1, ("full", "bt709"), 0.2126, 0.0722),
        (1, 5, ("limited", "bt601"), 0.299, 0.114),
        (2, 6, ("full", "bt601"), 0.299, 0.114),
    ],
)
def test_colour_range_and_matrix_are_honoured(tmp_path, colour_range, colorspace, names, kr, kb):
    y, u, v = 120, 90, 180
    frames = [yuv_frame(y, u, v, colour_range, colorspace) for _ in range(3)]

    def tag(stream):
        stream.codec_context.color_range, stream.codec_context.colorspace = colour_range, colorspace

    path = write(tmp_path / "colour.mp4", frames, setup=tag)
    info, (clip,) = clips(path, size=8)
    assert (info.properties["range"], info.properties["matrix"]) == names
    expected = rgb_reference(y, u, v, colour_range == 1, kr, kb)
    # libswscale's fast YUV -> RGB paths round to within 2 levels; the other range or matrix is
    # 9 or more levels away, so the bound still tells them apart
    others = [
        rgb_reference(y, u, v, limited, *coefficients)
        for limited in (True, False)
        for coefficients in ((0.2126, 0.0722), (0.299, 0.114))
    ]
    assert sorted(np.abs(other - expected).max() for other in others)[1] > 6
    assert np.abs(clip.frames.reshape(-1, 3) - expected).max() <= 2.5


def combed(t, size=32):
    """A vertical bar moving right 4 px per field; odd rows (bottom field) are half a frame later."""
    image = np.full((size, size, 3), 30, np.uint8)
    for row in range(size):
        left = 8 + round(8 * (t + (row % 2) / 2))
        image[row, left : left + 8] = 220
    return image


def test_interlaced_frames_are_deinterlaced(tmp_path):
    path = write(tmp_path / "interlaced.mp4", [combed(t) for t in range(6)], **{"x264-params": "tff=1"})
    info, (clip,) = clips(path, size=32, cfg=PrepConfig(min_clip_s=0.1))
    assert info.properties["interlaced"] is True
    with av.open(path) as container:
        raw = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(int)
    assert np.abs(raw[0] - raw[1]).max() > 100  # the decoded picture is combed
    for t, frame in enumerate(clip.frames.astype(int)):
        # each output frame is one moment: the whole bar where one field put it
        progressive = [np.repeat(combed(t)[row::2][:1], 32, 0).astype(int) for row in (0, 1)]
        assert min(np.abs(frame - p).mean() for p in progressive) < 4, t


def test_several_video_streams_use_the_default_one(tmp_path):
    path = str(tmp_path / "two.mkv")
    with av.open(path, "w", format="matroska") as container:
        streams = [container.add_stream("libx264", rate=8, options={"qp": "0"}) for _ in range(2)]
        for stream, default in zip(streams, (False, True)):
            stream.pix_fmt, stream.width, stream.height = "yuv444p", 32, 32
            stream.disposition = av.stream.Disposition.default if default else av.stream.Disposition(0)
        for _ in range(4):
            for stream, level in zip(streams, (50, 200)):
                frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
        for stream in streams:
            container.mux(stream.encode())
    info, (clip,) = clips(path, cfg=PrepConfig(min_clip_s=0.1))
    assert (info.properties["stream"], info.properties["video_streams"]) == (1, 2)
    assert np.abs(clip.frames.astype(int) - 200).max() <= 2


def test_summary_counts_what_the_collection_held(tmp_path):
    out = PrepOutput(tmp_path, shard_samples=10, shard_bytes=2**20)
    plain = {
        "stream": 0,
        "video_streams": 1,
        "rotation": 0,
        "mirrored": False,
        "vfr": False,
        "sar": "1:1",
        "range": "limited",
        "matrix": "bt709",
        "interlaced": False,
    }
    odd = {
        **plain,
        "rotation": 270,
        "vfr": True,
        "sar": "4:3",
        "range": "full",
        "matrix": "bt601",
        "interlaced": True,
        "video_streams": 2,
    }
    for i, video in enumerate([plain, plain, odd]):
        out.finish_input(
            {
                "entry": f"v{i}",
                "source": f"v{i}",
                "sha256": str(i),
                "status": "used",
                "reason": "",
                "clips": 1,
                "samples": 1,
                "seconds": 1.0,
                "frames": 8,
                "video": video,
            }
        )
    out.commit()
    assert out.summary({})["inputs_used_by_property"] == {
        "anamorphic": 1,
        "interlaced": 1,
        "matrix_bt601": 1,
        "matrix_bt709": 2,
        "range_full": 1,
        "range_limited": 2,
        "rotated": 1,
        "several_video_streams": 1,
        "variable_frame_rate": 1,
    }


@pytest.mark.parametrize("damage,problem", [("random", "not a tar archive"), ("cut", "truncated")])
def test_reshard_names_a_damaged_shard(tmp_path, capsys, damage, problem):
    out = PrepOutput(tmp_path, shard_samples=2, shard_bytes=2**20)
    meta = ClipMeta(
        duration=4.0, fps=1.0, stage=1, source="v.mp4", clip_start=0.0, clip_end=4.0, num_frames=5
    )
    for i in range(4):
        fields = encode_sample(f"k{i}", {"frames": np.zeros((5, 4, 4), np.int64)}, "a video", meta)
        out.add_sample(
            fields,
            {"key": f"k{i}", "source": "v.mp4", "clip": [0, 5], "window": [0, 4], "fps": 1.0, "stage": 1},
        )
    out.commit()
    shard = tmp_path / "shards" / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(
        np.random.default_rng(0).bytes(len(data)) if damage == "random" else data[: len(data) // 2]
    )
    with pytest.raises(SystemExit) as exit_code:
        reshard.main([str(tmp_path), "--divisible-by", "1"])
    assert exit_code.value.code == 2
    assert f"{shard}: {problem}" in capsys.readouterr().err
    assert shard.read_bytes()[:8] == (np.random.default_rng(0).bytes(8) if damage == "random" else data[:8])
