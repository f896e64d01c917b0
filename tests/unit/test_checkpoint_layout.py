"""Which checkpoint a run resumes from: the one `latest` names, unless its hgscale.json cannot be read; then the
newest complete one before it, with a warning naming the corrupt file (a bad checkpoint costs one interval)."""
import json

from hgscale.checkpoint.manager import resume_point
from hgscale.config import config_from_dict


def write_tag(root, step: int, meta: str | None = None) -> None:
    tag = root / f"step{step:08d}"
    tag.mkdir(parents=True)
    good = {"step": step, "topology": {"world_size": 1, "pipeline_stages": 1, "zero_stage": 1}, "config": {}}
    (tag / "hgscale.json").write_text(json.dumps(good) if meta is None else meta)
    (tag / "COMPLETE").write_text("")


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    root = tmp_path / "ckpt"
    for step in (2, 4):
        write_tag(root, step)
    write_tag(root, 6, meta='{"step": 6, "topol')  # cut short
    (root / "latest").write_text("step00000006")
    cfg = config_from_dict({"data": {"url": "/d"}, "checkpoint": {"dir": str(root)}})
    assert resume_point(cfg) == (root, "step00000004")
    err = capsys.readouterr().err
    assert "warning: skipping checkpoint step00000006" in err and str(root / "step00000006" / "hgscale.json") in err
    (root / "step00000004" / "hgscale.json").write_text("[]")  # valid JSON, not a checkpoint's
    assert resume_point(cfg) == (root, "step00000002")
    (root / "latest").write_text("step00000002")  # latest names an older one: it still comes first
    assert resume_point(cfg) == (root, "step00000002")


def test_when_no_checkpoint_reads_the_run_stops_instead_of_starting_over(tmp_path, capsys, monkeypatch):
    import pytest

    from hgscale.checkpoint.layout import CheckpointError

    monkeypatch.setenv("RANK", "1")  # warnings come from rank 0 only
    root = tmp_path / "ckpt"
    write_tag(root, 2, meta="\x00\x01")
    cfg = config_from_dict({"data": {"url": "/d"}, "checkpoint": {"dir": str(root)}})
    with pytest.raises(CheckpointError, match="no complete checkpoint of 1 \\(step00000002\\) can be read"):
        resume_point(cfg)
    assert capsys.readouterr().err == ""
    assert resume_point(config_from_dict({"data": {"url": "/d"}, "checkpoint": {"dir": str(tmp_path / "none")}})) \
        is None
