"""Inputs, captions, probing and clip extraction of one video (no Ray), and every bad input.

`make_bad_inputs` is shared with the pipeline tests."""

import fractions
import json
import os

import av
import numpy as np
import pytest
from PIL import Image

from cogvideo import synthetic as world
from cogvideo.configio import ConfigError
from data_prep.config import PrepConfig
from data_prep.inputs import REASONS, Rejected, caption_for, content_hash, list_inputs, load_captions
from data_prep.video import iter_clips, probe


def encode(path, frames, fps=8, pix_fmt="yuv444p", pts=None, **open_options):
    with av.open(str(path), "w", format="mp4", options=open_options) as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "0"})
        stream.pix_fmt, stream.width, stream.height = pix_fmt, frames.shape[2], frames.shape[1]
        if pts is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def moving(num_frames=17, colour="red", size=32):
    return world.render_frames(colour, "circle", "right", num_frames, size, 8, 8.0)


def make_bad_inputs(folder):
    """{file name: the reason it must be rejected for} for every bad video file of the issue."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero_bytes.mp4").write_bytes(b"")
    (folder / "not_a_video.mp4").write_text("name,age\nalice,3\n")
    encode(folder / "whole.mp4", moving(33))
    data = (folder / "whole.mp4").read_bytes()
    os.remove(folder / "whole.mp4")
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end
    encode(folder / "faststart.mp4", moving(64), movflags="faststart")  # index first, data cut
    data = (folder / "faststart.mp4").read_bytes()
    (folder / "truncated_faststart.mp4").write_bytes(data[: len(data) * 2 // 3])
    os.remove(folder / "faststart.mp4")
    encode(folder / "unknown_codec.mp4", moving())
    (folder / "unknown_codec.mp4").write_bytes(
        (folder / "unknown_codec.mp4").read_bytes().replace(b"avc1", b"zzzz")
    )
    with av.open(str(folder / "audio_only.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    encode(folder / "long_gap.mp4", moving(), pts=[125 * k + (5000 if k > 8 else 0) for k in range(17)])
    Image.fromarray(moving(1)[0]).save(folder / "image.mp4", format="PNG")
    (folder / "dangling_link.mp4").symlink_to(folder / "moved_away.mp4")
    encode(folder / "one_pixel.mp4", np.zeros((2, 1, 1, 3), np.uint8))
    with av.open(str(folder / "8k.mp4"), "w") as container:  # MJPEG of a blank frame: fast to write
        stream = container.add_stream("mjpeg", rate=8)
        stream.pix_fmt, stream.width, stream.height = "yuvj420p", 7680, 4320
        frame = av.VideoFrame(7680, 4320, "yuvj420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    encode(folder / "three_frames.mp4", moving(3))  # 0.25 s: 5 frames fit at no configured rate
    return {
        "zero_bytes.mp4": "empty_file",
        "not_a_video.mp4": "not_a_video",
        "truncated.mp4": "corrupt_container",
        "truncated_faststart.mp4": "truncated",
        "unknown_codec.mp4": "unreadable_codec",
        "audio_only.mp4": "no_video_stream",
        "long_gap.mp4": "broken_timestamps",
        "image.mp4": "not_a_video",
        "dangling_link.mp4": "broken_link",
        "one_pixel.mp4": "resolution_too_small",
        "8k.mp4": "resolution_too_large",
        "three_frames.mp4": "no_usable_clip",
    }


def test_probe_rejects_every_bad_file_with_its_reason(tmp_path):
    cfg = PrepConfig()
    expected = make_bad_inputs(tmp_path)
    for name, reason in expected.items():
        path = str(tmp_path / name)
        assert reason in REASONS
        with pytest.raises(Rejected) as err:
            if reason in ("empty_file", "broken_link"):
                content_hash(path)
            info = probe(path, cfg)
            assert reason == "no_usable_clip", name  # the only one that probes fine
            raise Rejected(reason)
        assert err.value.reason == reason, (name, str(err.value))
    with pytest.raises(Rejected, match="missing_file"):
        content_hash(str(tmp_path / "gone.mp4"))
    with pytest.raises(Rejected, match="missing_file"):
        probe(str(tmp_path / "gone.mp4"), cfg)
    assert probe(str(tmp_path / "three_frames.mp4"), cfg).num_frames == 3 and info is not None


def test_probe_reads_size_rate_and_frame_count(tmp_path):
    encode(tmp_path / "v.mp4", np.zeros((20, 48, 64, 3), np.uint8), fps=25, pix_fmt="yuv420p")
    info = probe(str(tmp_path / "v.mp4"), PrepConfig())
    assert (info.width, info.height, info.fps, info.num_frames, info.codec) == (64, 48, 25, 20, "h264")
    assert info.seconds == pytest.approx(0.8)


def test_clips_split_at_a_hard_cut_and_at_max_length(tmp_path):
    scene_a = moving(24)
    scene_b = world.render_frames("blue", "square", "left", 20, 32, 8, 8.0)
    scene_b[(scene_b == world.BACKGROUND).all(-1)] = (200, 200, 200)  # a different shot: bright background
    encode(tmp_path / "cut.mp4", np.concatenate([scene_a, scene_b]))
    path = str(tmp_path / "cut.mp4")
    cfg = PrepConfig()
    clips = list(iter_clips(path, probe(path, cfg), cfg, 32))
    assert [(c.index, c.first_frame, len(c.frames)) for c in clips] == [(0, 0, 24), (1, 24, 20)]
    assert np.abs(clips[1].frames.astype(int) - scene_b).max() <= 3
    short = PrepConfig(max_clip_s=1.0)  # at most 1 s = 9 frames at 8 fps
    lengths = [len(c.frames) for c in iter_clips(path, probe(path, short), short, 32)]
    assert lengths == [9, 9, 6, 9, 9, 2]


def test_frames_are_resized_and_centre_cropped_like_a_reference(tmp_path):
    ys, xs = np.mgrid[0:48, 0:96]
    image = np.stack([xs * 2.5, ys * 5, 255 - xs * 2.5], -1).astype(np.uint8)  # smooth, wide (2:1)
    encode(tmp_path / "wide.mp4", np.repeat(image[None], 9, 0))
    path = str(tmp_path / "wide.mp4")
    (clip,) = iter_clips(path, probe(path, PrepConfig()), PrepConfig(), 16)
    with av.open(path) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    reference = np.asarray(Image.fromarray(decoded[:, 24:72]).resize((16, 16), Image.BOX))
    assert clip.frames.shape == (9, 16, 16, 3)
    assert np.abs(clip.frames[0].astype(int) - reference).max() <= 8


def test_list_inputs_folders_globs_and_repeats(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.mp4", "a/y.MKV", "a/notes.txt", "z.mp4"):
        (tmp_path / name).write_bytes(b"1")
    found = list_inputs(
        [str(tmp_path / "a"), str(tmp_path / "*.mp4"), str(tmp_path / "a" / "x.mp4")], [".mp4", ".mkv"]
    )
    assert found.files == [
        str(tmp_path / "a/x.mp4"),
        str(tmp_path / "a/y.MKV"),
        str(tmp_path / "z.mp4"),
        str(tmp_path / "a/x.mp4"),
    ]
    assert found.ignored == [str(tmp_path / "a/notes.txt")]  # a folder's other files are counted
    with pytest.raises(ConfigError, match="nothing.mp4"):
        list_inputs([str(tmp_path / "nothing.mp4")], [".mp4"])


def test_captions_from_csv_jsonl_and_sidecars_with_every_caption_problem(tmp_path):
    videos = {name: tmp_path / name for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4")}
    (tmp_path / "caps.csv").write_bytes(
        b"path,caption\na.mp4,a red circle\nb.mp4,  \nc.mp4,caf\xe9 latin-1\n"
    )
    csv_captions = load_captions(tmp_path / "caps.csv")
    rows = [{"path": "a.mp4", "caption": "a red circle", "extra": 1}, {"path": "b.mp4", "caption": ""}]
    (tmp_path / "caps.jsonl").write_bytes(
        ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
        + b'{"path": "c.mp4", "caption": "caf\xe9"}\n'
    )
    jsonl_captions = load_captions(tmp_path / "caps.jsonl")
    for captions in (csv_captions, jsonl_captions):
        assert caption_for(str(videos["a.mp4"]), captions).caption == "a red circle"
        assert caption_for(str(videos["b.mp4"]), captions).problem == "empty_caption"
        assert caption_for(str(videos["c.mp4"]), captions).problem == "caption_not_utf8"
        assert caption_for(str(videos["d.mp4"]), captions).problem == "missing_caption"
    (tmp_path / "a.txt").write_text(" a sidecar caption\n")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe")
    assert caption_for(str(videos["a.mp4"]), None).caption == "a sidecar caption"
    assert caption_for(str(videos["c.mp4"]), None).problem == "caption_not_utf8"
    assert caption_for(str(videos["e.mp4"]), None).problem == "missing_caption"
    (tmp_path / "bad.csv").write_text("file,text\nx,y\n")
    with pytest.raises(ConfigError, match="bad.csv.*path,caption"):
        load_captions(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        load_captions(tmp_path / "bad.jsonl")


# ---- timestamps as players take them ---------------------------------------------------------

DIVX_PACKED = b"\x00\x00\x01\xb2DivX503b1393p"  # user data of a DivX 5 encoder: "packed bitstream"
VOP = b"\x00\x00\x01\xb6"  # MPEG-4 Part 2 video object plane start code


def n_vop(time_increment_bits: int) -> bytes:
    """A not-coded P-VOP: the placeholder chunk a packed bitstream stores after a B-frame."""
    bits = "01" + "0" + "1" + "0" * time_increment_bits + "1" + "0"  # type P, time 0, vop_coded 0
    bits += "0" + "1" * ((8 - (len(bits) + 1) % 8) % 8)  # stuffing to the byte boundary
    return VOP + int(bits, 2).to_bytes(len(bits) // 8, "big")


def write_b_frame_avis(folder, frames, fps=8):
    """The same MPEG-4 Part 2 stream with B-frames (PyAV's mpeg4 encoder) in two AVI files: as FFmpeg
    writes it (plain.avi), and as DivX 5 and Xvid wrote it (packed.avi: each B-frame stored in the
    chunk of the anchor frame before it, then a not-coded chunk), whose frames FFmpeg decodes in
    display order but with their chunks' timestamps, which are in decode order."""
    plain, packed = folder / "plain.avi", folder / "packed.avi"
    with av.open(str(plain), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps, options={"bf": "1", "g": "12"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(plain)) as source, av.open(str(packed), "w", format="avi") as target:
        out = target.add_stream_from_template(source.streams.video[0])
        packets = [(bytes(p), p.is_keyframe) for p in source.demux(video=0) if p.size]
        chunks, i = [], 0
        while i < len(packets):
            data, key = packets[i]
            if key:
                data = data.replace(VOP, DIVX_PACKED + VOP, 1)
            after = packets[i + 1][0] if i + 1 < len(packets) else b""
            if after and after[after.find(VOP) + 4] >> 6 == 2:  # a B-VOP: packed with its anchor
                chunks += [(data + after, key), (n_vop((fps - 1).bit_length()), False)]
                i += 2
            else:
                chunks.append((data, key))
                i += 1
        for n, (data, key) in enumerate(chunks):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts, packet.time_base = out, n, n, out.time_base
            packet.is_keyframe = key
            target.mux(packet)
    return plain, packed


def decoded(path, cfg):
    clips = list(iter_clips(str(path), probe(str(path), cfg), cfg, 32))
    return np.concatenate([c.frames for c in clips]), np.concatenate([c.times for c in clips])


def test_mpeg4_b_frames_in_avi_are_used_as_players_show_them(tmp_path, monkeypatch):
    """Both files give the frames of the plain one, at times i / fps; without reordering the packed
    file's timestamps (the planted bug) it is rejected as broken, as before."""
    from data_prep import video

    frames = moving(40)
    plain, packed = write_b_frame_avis(tmp_path, frames)
    with av.open(str(packed)) as container:  # the decoder's own timestamps are out of display order
        pts = [f.pts for f in container.decode(video=0)]
    assert len(pts) == 40 and pts != sorted(pts)
    cfg = PrepConfig()
    plain_frames, plain_times = decoded(plain, cfg)
    packed_frames, packed_times = decoded(packed, cfg)
    np.testing.assert_allclose(plain_times, np.arange(40) / 8)
    np.testing.assert_array_equal(packed_frames, plain_frames)
    np.testing.assert_allclose(packed_times, plain_times)
    monkeypatch.setattr(video, "REORDER_DEPTH", 0)
    with pytest.raises(Rejected, match="broken_timestamps: .*packed.avi: frame 2 is shown at"):
        decoded(packed, cfg)


def write_mkv(path, frames, shown, fps=8):
    """MPEG-4 Part 2 without B-frames in Matroska, frame i shown at `shown[i]` (in frames)."""
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=fps, options={"bf": "0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        packets = [
            p for image in frames for p in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24"))
        ]
        packets += stream.encode()
        for i, packet in enumerate(packets):  # decode times in order, each before its shown time
            step = round(1 / (fps * packet.time_base))
            packet.pts, packet.dts = (shown[i] + len(frames)) * step, i * step
            container.mux(packet)


def test_timestamps_out_of_order_beyond_the_reorder_delay_are_still_broken(tmp_path):
    """Frames 5 and 30 swap times (no B-frames: the decoder keeps its input order): no reorder delay
    explains that, and the file is rejected; in order, the same frames are used."""
    frames = moving(40)
    write_mkv(tmp_path / "in_order.mkv", frames, list(range(40)))
    np.testing.assert_allclose(decoded(tmp_path / "in_order.mkv", PrepConfig())[1], np.arange(40) / 8)
    swapped = [{5: 30, 30: 5}.get(i, i) for i in range(40)]
    write_mkv(tmp_path / "swapped.mkv", frames, swapped)
    with pytest.raises(Rejected, match="broken_timestamps: .*swapped.mkv: frame"):
        decoded(tmp_path / "swapped.mkv", PrepConfig())
