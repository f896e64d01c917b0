"""Tracker against the embedded SQLite store, and against a loopback HTTP server that refuses or stalls."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hgscale.config import Config
from hgscale.tracking import Tracker, names, resolve_uri


def make_cfg(run_dir, **tracking):
    cfg = Config()
    cfg.run_dir = str(run_dir)
    cfg.data.url = "s3://corpus/enwik8"
    cfg.deepspeed = {"aws_secret_access_key": "wJalrXUtnFEMI", "wall_clock_breakdown": False}
    cfg.tracking.experiment = "unit"
    for k, v in tracking.items():
        setattr(cfg.tracking, k, v)
    return cfg


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")


def steps_of(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_embedded_store_records_the_run(tmp_path):
    cfg = make_cfg(tmp_path / "run", run_name="unit-embedded")
    tr = Tracker(cfg, rank=0, world_size=1)
    assert tr.uri == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    assert tr.run_id
    tr.log_run_info(cfg, {"train_batch_size": 8, "zero_optimization": {"stage": 1}},
                    {"nodes": 1, "pipeline_stages": 1, "dp": 1}, {"name": "demo", "shards": ["a", "b"]},
                    {"stages": [{"layers": [0, 5]}], "imbalance": 1.0})
    tr.log_run_info(cfg, {"train_batch_size": 99}, {}, None, None)    # logged once: ignored
    for s in range(1, 31):
        tr.log_metrics({names.TRAIN_LOSS: 5.0 - 0.1 * s, names.FLOPS: 1e9 * s,
                        "val/bpc": 3.0 - 0.01 * s if s % 10 == 0 else None}, s)
    tr.log_metrics({"bad": "not a number", "train/lr": 1e-3}, 31)     # a bad value is skipped, not raised
    extra = tmp_path / "export.txt"
    extra.write_text("weights v1")
    tr.log_artifact(extra, "export")
    extra.write_text("changed after logging")                          # the logged copy is the v1 one
    assert tr.close() is True
    assert tr.close() is True                                          # idempotent

    c = MlflowClient(tr.uri)
    run = c.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit-embedded"
    p = run.data.params
    assert p["model.d_model"] == "512" and p["data.url"] == "s3://corpus/enwik8"
    assert p["deepspeed.aws_secret_access_key"] == "***" and "wJalrXUtnFEMI" not in json.dumps(p)
    assert p["ds.train_batch_size"] == "8" and p["ds.zero_optimization.stage"] == "1"
    assert p["topology.pipeline_stages"] == "1" and p["topology.world_size"] == "1"
    assert p["version.torch"].startswith("2.") and "version.deepspeed" in p and "version.cuda" in p
    assert p["dataset.name"] == "demo" and p["dataset.shards.n"] == "2"
    assert p["stage_plan.imbalance"] == "1.0"
    assert steps_of(c, tr.run_id, names.TRAIN_LOSS) == list(range(1, 31))
    assert steps_of(c, tr.run_id, "val/bpc") == [10, 20, 30]
    assert steps_of(c, tr.run_id, "train/lr") == [31] and "bad" not in run.data.metrics
    arts = {a.path for a in c.list_artifacts(tr.run_id, "run_info")}
    assert arts == {f"run_info/{n}.json" for n in ("config", "deepspeed", "topology", "manifest", "stage_plan")}
    dl = Path(c.download_artifacts(tr.run_id, "run_info/config.json", str(tmp_path / "dl")))
    assert json.loads(dl.read_text())["deepspeed"]["aws_secret_access_key"] == "***"
    assert Path(c.download_artifacts(tr.run_id, "export/export.txt", str(tmp_path / "dl"))).read_text() == "weights v1"
    png = Path(c.download_artifacts(tr.run_id, "plots/loss_vs_flops.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # artifacts of the embedded store live in the run directory, not in the working directory
    assert (tmp_path / "run" / "mlartifacts").is_dir()
    assert list((tmp_path / "run" / "tracking" / "artifacts").iterdir()) == []   # staged copy removed once uploaded


def test_resume_continues_the_same_run(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    a = Tracker(cfg, 0, 1)
    a.log_run_info(cfg, {}, {"nodes": 1}, None, None)
    for s in range(1, 6):
        a.log_metrics({names.TRAIN_LOSS: 1.0 / s}, s)
    assert a.close(status="KILLED")
    cfg.train.steps = 5000                                   # the resumed command changed a setting
    b = Tracker(cfg, 0, 1, resume_run_id=a.run_id)
    assert b.run_id == a.run_id and b.resumed
    b.log_run_info(cfg, {}, {"nodes": 1}, None, None)
    for s in range(6, 11):
        b.log_metrics({names.TRAIN_LOSS: 1.0 / s}, s)
    assert b.close()
    c = MlflowClient(b.uri)
    run = c.get_run(a.run_id)
    assert run.info.status == "FINISHED"
    assert steps_of(c, a.run_id, names.TRAIN_LOSS) == list(range(1, 11))
    assert run.data.params["train.steps"] == "1000"          # params are immutable in MLflow ...
    assert run.data.tags["param_changed_on_resume/train.steps"] == "5000"   # ... the change is on record
    assert len(c.search_runs([run.info.experiment_id])) == 1


def test_steps_an_attempt_runs_again_after_a_resume_are_logged_once(tmp_path):
    """Attempt A logs steps 1-8 and dies; B resumes from A's step-5 checkpoint and runs 6-10 again: MLflow holds each
    step once (the first value: a resume is exact, the values are the same), for every key, and B's new steps."""
    cfg = make_cfg(tmp_path / "run")
    a = Tracker(cfg, 0, 1)
    for s in range(1, 9):
        a.log_metrics({names.TRAIN_LOSS: 1.0 / s, names.LR: 0.1}, s)
    assert a.close(status="KILLED")
    b = Tracker(cfg, 0, 1, resume_run_id=a.run_id)
    for s in range(6, 11):
        b.log_metrics({names.TRAIN_LOSS: 2.0 / s, names.LR: 0.2, names.GRAD_NORM: 3.0}, s)
    assert b.close()
    c = MlflowClient(b.uri)
    for key in (names.TRAIN_LOSS, names.LR):
        assert steps_of(c, a.run_id, key) == list(range(1, 11)), key
    assert steps_of(c, a.run_id, names.GRAD_NORM) == list(range(6, 11))  # a key A never logged: all of B's
    got = {m.step: m.value for m in c.get_metric_history(a.run_id, names.TRAIN_LOSS)}
    assert got[8] == 1.0 / 8 and got[9] == 2.0 / 9


def test_other_ranks_and_disabled_tracking_touch_nothing(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    r1 = Tracker(cfg, rank=1, world_size=2)
    assert r1.run_id is None
    r1.log_metrics({"x": 1.0}, 1)
    r1.log_run_info(cfg, {}, {}, None, None)
    r1.gather_and_log(1, {"step_s": 1.0})                    # no process group: a local no-op
    assert r1.close() is True
    cfg.tracking.enabled = False
    r0 = Tracker(cfg, rank=0, world_size=1)
    assert r0.run_id is None and r0.close() is True
    assert not (tmp_path / "run" / "mlflow.db").exists()


def test_uri_resolution(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_uri(cfg) == "http://127.0.0.1:5999"
    cfg.tracking.uri = "sqlite:////tmp/x.db"
    assert resolve_uri(cfg) == "sqlite:////tmp/x.db"
    cfg.tracking.uri = "htp://host:5000"
    with pytest.raises(ValueError, match=r"tracking.uri = 'htp://host:5000' has an unknown scheme 'htp'"):
        resolve_uri(cfg)


class _Unwell(BaseHTTPRequestHandler):
    """A tracking server that refuses (HTTP 503) or stalls past the client's timeout."""

    def _answer(self):
        self.server.hits += 1
        if self.server.mode == "stall":
            time.sleep(3)
        body = b"service unavailable"
        try:
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    do_GET = do_POST = _answer

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("mode", ["refuse", "stall"])
def test_unwell_server_never_blocks_training_and_nothing_is_lost(tmp_path, mode, caplog):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Unwell)
    srv.daemon_threads, srv.mode, srv.hits = True, mode, 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        # a password in the URI must stay out of the warnings about the outage
        cfg = make_cfg(tmp_path / "run", uri=f"http://hg:hunter2@127.0.0.1:{srv.server_port}", start_timeout_s=1.0)
        t0 = time.monotonic()
        tr = Tracker(cfg, 0, 1)
        assert time.monotonic() - t0 < 10 and tr.run_id is None   # start-up waited a bounded time
        worst = 0.0
        for s in range(1, 201):
            t = time.perf_counter()
            tr.log_metrics({names.TRAIN_LOSS: 1.0 + s, "train/lr": 0.1}, s)
            worst = max(worst, time.perf_counter() - t)
        assert worst < 0.25, f"log_metrics blocked for {worst:.3f} s"
        t0 = time.monotonic()
        assert tr.close(timeout=1.0) is False                        # not delivered ...
        assert time.monotonic() - t0 < 10                            # ... but close() came back
        assert srv.hits >= 1                                          # the server really was asked
        assert "is not answering" in caplog.text and "hg:***@127.0.0.1" in caplog.text
        assert "hunter2" not in caplog.text
    finally:
        srv.shutdown()
    spool = tmp_path / "run" / "tracking_spool.jsonl"
    spooled = [json.loads(line) for line in spool.read_text().splitlines()]
    assert sorted(i["step"] for i in spooled if i["kind"] == "Metrics") == list(range(1, 201))
    # The next attempt of the run (here with the embedded store) replays the spool: all 200 steps arrive.
    cfg.tracking.uri = ""
    again = Tracker(cfg, 0, 1)
    assert again.close()
    c = MlflowClient(again.uri)
    assert steps_of(c, again.run_id, names.TRAIN_LOSS) == list(range(1, 201))
    assert [m.value for m in sorted(c.get_metric_history(again.run_id, names.TRAIN_LOSS), key=lambda m: m.step)][:3] \
        == [2.0, 3.0, 4.0]
    assert not spool.exists()


def test_resume_of_a_run_missing_from_the_store_starts_a_new_one(tmp_path):
    cfg = make_cfg(tmp_path / "run")
    tr = Tracker(cfg, 0, 1, resume_run_id="0123456789abcdef0123456789abcdef")
    assert tr.run_id and tr.run_id != "0123456789abcdef0123456789abcdef" and not tr.resumed
    tr.log_metrics({names.TRAIN_LOSS: 1.0}, 7)
    assert tr.close()
    run = MlflowClient(tr.uri).get_run(tr.run_id)
    assert run.data.tags["hgscale.resumed_from_missing_run"] == "0123456789abcdef0123456789abcdef"
    assert run.data.metrics[names.TRAIN_LOSS] == 1.0
