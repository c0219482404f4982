"""cogvideo.jsonl: readers see complete rows only; a rewrite keeps the rows asked for and drops a
torn last line (what a crash mid-write leaves); the trainer's metrics log is cut back with it."""

import json

from cogvideo.jsonl import iter_jsonl, read_jsonl, rewrite_jsonl, write_jsonl
from pretrain.metrics import truncate_jsonl


def test_torn_last_line_is_invisible_and_dropped_by_a_rewrite(tmp_path):
    path = tmp_path / "log.jsonl"
    write_jsonl(path, [{"step": 1, "caption": "视频"}, {"step": 2}], "w")
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1, "caption": "视频"}, {"step": 2}]
    assert "视频" in path.read_text(encoding="utf-8")  # not \u-escaped
    rewrite_jsonl(path, lambda row: True)
    assert path.read_text(encoding="utf-8").endswith("}\n") and list(iter_jsonl(path)) == read_jsonl(path)
    assert list(iter_jsonl(tmp_path / "missing.jsonl")) == []


def test_truncate_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6'
    )
    truncate_jsonl(path, 3)
    assert [row["step"] for row in read_jsonl(path)] == [1, 2, 3]
    truncate_jsonl(path, 0)
    assert path.read_text() == ""
