"""Every input of a user's folder accounted for, the same way in every command that reads one:
captions rows without a video and videos without a caption (with the near match a case typo
leaves), files of other types counted as ignored, a text file named .mp4 is `not_a_video` for
data preparation, the image tokenizer fit and FVD alike, a 10 MB caption is one line naming its
row, and the fit decodes an 8K clip at the size it uses."""

from __future__ import annotations

import av
import pytest
from test_data_prep_video import moving

from cogvideo.captions import MAX_CAPTION_CHARS, CaptionsFileError, read_captions
from cogvideo.eval.fvd import FVDProtocol, _load_set, sample_size_warnings
from cogvideo.tokenizers.patch_fit import read_frames
from cogvideo.video_io import VideoFileError, list_media, open_video, square_frames, write_mp4
from data_prep.config import PrepConfig
from data_prep.inputs import Rejected, list_inputs
from data_prep.output import REJECTED, PrepOutput
from data_prep.pipeline import plan_inputs, report_unmatched
from data_prep.video import probe

# ---- captions files --------------------------------------------------------------------------


def test_a_10_mb_caption_is_one_row_problem_naming_the_row_not_a_csv_error(tmp_path):
    path = tmp_path / "captions.csv"
    huge = "a" * (10 * 2**20)
    path.write_text(
        f'path,caption\na.mp4,a red circle\nb.mp4,{huge}\nc.mp4,"a blue, square"\n', encoding="utf-8"
    )
    rows = read_captions(path)
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert [r.caption for r in rows] == ["a red circle", None, "a blue, square"]
    problem = rows[1]
    assert (
        problem.problem == "caption_too_long"
        and f"{path}:3: the caption is 10,485,760 characters" in problem.detail
    )
    assert f"at most {MAX_CAPTION_CHARS:,}" in problem.detail and "\n" not in problem.detail


def test_an_unclosed_quote_names_the_row_whose_field_swallowed_the_rest(tmp_path):
    path = tmp_path / "captions.csv"
    rows = ["path,caption", 'a.mp4,"a red circle'] + [
        f"v{i}.mp4,caption number {i} " + "x" * 200 for i in range(400)
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    [swallowed] = read_captions(path)
    assert swallowed.where == f"{path}:2" and swallowed.problem == "caption_too_long"
    assert 'a quote (") left open' in swallowed.detail


def test_captions_files_that_cannot_be_read_are_one_line(tmp_path):
    (tmp_path / "headless.csv").write_text("a.mp4,a red circle\n")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4", "caption": "x"}\n{"path": 3}\n')
    for name, message in (
        ("headless.csv", "headless.csv: expected a header with columns path,caption"),
        ("bad.jsonl", "bad.jsonl:2: expected a JSON object"),
    ):
        with pytest.raises(CaptionsFileError, match=message) as err:
            read_captions(tmp_path / name)
        assert "\n" not in str(err.value)


# ---- prep: every caption row and every file accounted for ---------------------------------------


def user_folder(root):
    """A user's folder: two captioned videos, one whose row spells it in another case, a caption row
    for a video that is not there, cover.jpg with a caption, notes.txt, a text file named .mp4."""
    videos = root / "videos"
    videos.mkdir()
    for name in ("a.mp4", "Clip1.mp4"):
        write_mp4(videos / name, moving(9), 8)
    (videos / "cover.jpg").write_bytes(b"\xff\xd8\xff")
    (videos / "notes.txt").write_text("shot on a phone\n")
    (videos / "readme.mp4").write_text("not a video at all\n")
    rows = [
        ("a.mp4", "a red circle"),
        ("clip1.mp4", "a case typo"),
        ("gone.mp4", "a video never copied"),
        ("cover.jpg", "the cover"),
        ("readme.mp4", "a text file"),
    ]
    (videos / "captions.csv").write_text(
        "path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows), encoding="utf-8"
    )
    return videos


def test_prep_counts_and_lists_what_matches_nothing_with_a_did_you_mean(tmp_path, capsys):
    videos = user_folder(tmp_path)
    captions = str(videos / "captions.csv")
    out = PrepOutput(tmp_path / "prep", 10, 2**20)
    listing = list_inputs([str(videos)], [".mp4"], captions)
    assert sorted(p.split("/")[-1] for p in listing.ignored) == ["cover.jpg", "notes.txt"]  # not captions.csv
    todo, rejected, unmatched = plan_inputs(listing, captions, out)
    assert sorted(r["path"].split("/")[-1] for r in todo) == [
        "a.mp4",
        "readme.mp4",
    ]  # readme: not_a_video later
    [typo] = rejected
    assert typo["reason"] == "missing_caption" and typo["source"].endswith("Clip1.mp4")
    assert typo["detail"].endswith(f"; did you mean {captions}:3 (clip1.mp4)?")
    by_entry = {r["entry"]: r for r in unmatched}
    assert by_entry[f"{captions}:3"]["detail"].endswith("no file clip1.mp4; did you mean Clip1.mp4?")
    assert by_entry[f"{captions}:4"]["detail"].endswith("no file gone.mp4")
    assert "not in prep.extensions" in by_entry[f"{captions}:5"]["detail"]  # cover.jpg
    assert sorted(r["reason"] for r in unmatched) == [
        "caption_without_video",
        "caption_without_video",
        "caption_without_video",
        "ignored_file",
        "ignored_file",
    ]
    report_unmatched(unmatched, rejected, out)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "cogvideo-prep: 3 caption row(s) name no input video; 1 video(s) have no caption; 2 file(s) in the "
        f"input folders are not videos by extension (prep.extensions): each is listed in {out.root / REJECTED}"
    )
    assert any("did you mean Clip1.mp4?" in line for line in err[1:])
    assert any("did you mean " in line and "(clip1.mp4)?" in line for line in err[1:])


def test_the_summary_counts_them_and_a_rerun_rewrites_them_in_place(tmp_path):
    videos = user_folder(tmp_path)
    captions = str(videos / "captions.csv")
    listing = list_inputs([str(videos)], [".mp4"], captions)

    def run():
        out = PrepOutput(tmp_path / "prep", 10, 2**20)
        todo, rejected, unmatched = plan_inputs(listing, captions, out)
        for record in rejected:
            out.add_rejection({**record, "clip": None})
            out.finish_input({k: v for k, v in record.items() if k != "detail"})
        out.commit()
        out.record_unmatched(unmatched)
        return out.summary({}), (tmp_path / "prep" / REJECTED).read_bytes()

    summary, first = run()
    assert (
        summary["videos_without_caption"],
        summary["captions_without_video"],
        summary["files_ignored"],
    ) == (1, 3, 2)
    assert summary["inputs"] == 1  # caption rows and ignored files are no inputs
    summary_again, second = run()
    assert summary_again == summary and second == first


# ---- one rule for a file that is not a video ---------------------------------------------------


def test_a_text_file_named_mp4_is_not_a_video_in_prep_the_fit_and_fvd(tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_mp4(folder / "good.mp4", moving(17), 8)
    (folder / "readme.mp4").write_text("not a video at all\n")
    (folder / "cover.jpg").write_bytes(b"\xff\xd8\xff")  # an image suffix, not an image
    (folder / "notes.txt").write_text("shot on a phone\n")
    with pytest.raises(VideoFileError) as err:
        open_video(folder / "readme.mp4")
    assert err.value.reason == "not_a_video"
    with pytest.raises(Rejected, match="not_a_video: .*readme.mp4"):  # prep
        probe(str(folder / "readme.mp4"), PrepConfig())
    capsys.readouterr()
    fit = read_frames(str(folder), 16)  # the image tokenizer fit
    assert fit.files == [str(folder / "good.mp4")] and len(fit.frames) == 17
    assert fit.ignored == [str(folder / "notes.txt")]
    assert [line.split(":")[0] for line in fit.skipped] == [
        str(folder / "cover.jpg"),
        str(folder / "readme.mp4"),
    ]
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "readme.mp4" in line] == [
        f"skipping {folder / 'readme.mp4'}: not a video " + lines[-1].split("not a video ")[1]
    ]
    videos, found = _load_set(folder, FVDProtocol(short_videos="resample"), "real", progress=True)  # FVD
    assert found.count == len(videos) == 1 and found.ignored == 2  # cover.jpg and notes.txt are no videos
    assert [s.split(":")[0] for s in found.skipped] == [str(folder / "readme.mp4")]
    err = capsys.readouterr().err
    assert f"skipping {folder / 'readme.mp4'}: not a video" in err and "reading real" in err  # progress


def test_a_folder_listing_names_a_pattern_that_matches_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        list_media([str(tmp_path / "nothing*.mp4")], [".mp4"])


def test_fvd_warns_with_the_numbers_when_a_side_is_smaller_than_the_feature_dimensions():
    from cogvideo.eval.fvd import VideoSet

    real, fake = VideoSet(9, [8.0], [[32, 32]], "own-videos"), VideoSet(4, [8.0], [[32, 32]], "generated")
    [warning] = sample_size_warnings(real, fake, 400)
    assert warning.startswith(
        "FVD from 9 own-videos and 4 generated videos: 9 own-videos and 4 generated are fewer"
    )
    assert "400 feature dimensions" in warning
    assert sample_size_warnings(VideoSet(500, [], [], "a"), VideoSet(400, [], [], "b"), 400) == []


# ---- the fit decodes at the size it uses -------------------------------------------------------


def write_8k_mjpeg(path, frames=2):
    with av.open(str(path), "w") as container:  # MJPEG of flat frames: fast to write
        stream = container.add_stream("mjpeg", rate=8)
        stream.pix_fmt, stream.width, stream.height = "yuvj420p", 7680, 4320
        for k in range(frames):
            frame = av.VideoFrame(7680, 4320, "yuvj420p")
            for plane in frame.planes:
                plane.update(bytes([40 + 80 * k]) * plane.buffer_size)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def peak_rss_increase(fn) -> int:
    """Bytes the process's peak RSS (VmHWM) rose above its RSS while `fn` ran."""

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def test_an_8k_clip_is_decoded_at_the_size_the_fit_uses(tmp_path):
    """Bound: the decoder's own frames at the source size (an 8K yuv420 frame is 47 MiB; it holds
    the one it decodes and the one it hands on, and libavcodec keeps one spare in its pool: 3), the
    output at 32 px, 16 MiB of noise. Turning every frame into full-size RGB first (the planted bug,
    as read_video does) holds 95 MiB more per frame."""
    path = tmp_path / "8k.avi"
    write_8k_mjpeg(path)
    source_frame = 7680 * 4320 * 3 // 2
    bound = 3 * source_frame + (16 << 20)
    frames = []
    used = peak_rss_increase(lambda: frames.append(square_frames(path, 32)))
    assert frames[0].shape == (2, 32, 32, 3) and frames[0][1].mean() > frames[0][0].mean()
    assert used <= bound, f"{used / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    from cogvideo.video_io import read_video

    assert peak_rss_increase(lambda: read_video(path)) > bound  # full-size RGB frames: the bound catches it


def test_the_fit_command_names_an_unreadable_file_in_one_line(tmp_path, capsys):
    from cogvideo.tokenizers.patch_fit import main

    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(100))  # an mp4 cut short
    with pytest.raises(SystemExit) as exit:
        main(["preset=small", f"frames={folder}", f"out={tmp_path / 'tok.safetensors'}"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "broken.mp4" in line]
    assert lines[0].startswith(f"skipping {folder / 'broken.mp4'}: a video container that does not open")
    assert len(lines) == 1 and err.strip().splitlines()[-1].endswith(
        "no frames found at "
        + str(folder)
        + " (expected .png, .jpg, .jpeg, .mp4, .mkv, .mov, .avi, .webm, .m4v; 1 file(s) unreadable)"
    )
