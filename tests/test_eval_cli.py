import json

import numpy as np

from cogvideo.eval.cli import main
from cogvideo.synthetic import caption_for, render_frames
from cogvideo.video_io import write_mp4


def test_prompts_and_recon_write_json(tmp_path):
    videos, recon = tmp_path / "videos", tmp_path / "recon"
    videos.mkdir()
    recon.mkdir()
    rows = []
    for i, (colour, shape, direction) in enumerate([("red", "circle", "left"), ("cyan", "triangle", "down")]):
        frames = render_frames(colour, shape, direction, 6, 32, 8.0, 12.0, seed=i)
        write_mp4(videos / f"v{i}.mp4", frames, 8.0)
        write_mp4(recon / f"v{i}.mp4", frames, 8.0, crf=35)
        rows.append(
            {
                "file": f"v{i}.mp4",
                "prompt": caption_for(colour, shape, direction),
                "duration": 1.0,
                "heldout": True,
            }
        )
    (videos / "manifest.json").write_text(json.dumps(rows))

    assert main(["prompts", "--videos", str(videos), "--out", str(tmp_path / "p.json")]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["accuracy"]["heldout"]["all"] == 1.0
    np.testing.assert_allclose(
        report["displacement_by_duration"]["1"]["mean_px_per_frame"], 12.0 / 8.0, atol=0.2
    )

    assert (
        main(
            [
                "recon",
                "--reference",
                str(videos),
                "--reconstruction",
                str(recon),
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    recon_report = json.loads((tmp_path / "r.json").read_text())
    assert set(recon_report["videos"]) == {"v0", "v1"} and len(recon_report["videos"]["v0"]["psnr_db"]) == 6
    assert 20 < recon_report["mean_psnr_db"] < 60 and 0.5 < recon_report["mean_ssim"] < 1.0


def test_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    assert main(["prompts", "--videos", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
