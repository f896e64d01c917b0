"""The tracking server dies mid-run and comes back: training never waits, and every metric step arrives."""
import time

import pytest
from mlflow.tracking import MlflowClient

from hgscale.config import Config
from hgscale.tracking import Tracker, names

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _cfg(tmp_path, uri):
    cfg = Config()
    cfg.run_dir = str(tmp_path / "run")
    cfg.data.url = "unused"
    cfg.tracking.uri = uri
    cfg.tracking.experiment = "outage"
    cfg.tracking.close_timeout_s = 120.0
    return cfg


def _log(tr, steps, worst):
    for s in steps:
        t = time.perf_counter()
        tr.log_metrics({names.TRAIN_LOSS: 10.0 / s, names.FLOPS: 1e12 * s, "train/lr": 1e-4 * s}, s)
        worst[0] = max(worst[0], time.perf_counter() - t)
        time.sleep(0.02)      # a training step


def test_server_stopped_and_restarted_mid_run(tmp_path, mlflow_server_factory, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    server = mlflow_server_factory().start()
    tr = Tracker(_cfg(tmp_path, server.uri), 0, 1)
    run_id = tr.run_id
    assert run_id
    worst = [0.0]
    _log(tr, range(1, 51), worst)
    server.stop()                                            # the server process is gone
    _log(tr, range(51, 151), worst)
    time.sleep(1.0)
    assert tr._sink.last_error is not None                   # the delivery thread did hit the dead server
    assert tr._sink.pending() > 0                            # ... and holds what it could not send
    server.start()                                           # same port, same SQLite store
    _log(tr, range(151, 201), worst)
    assert tr.close() is True
    assert worst[0] < 0.25, f"log_metrics blocked the training thread for {worst[0]:.3f} s"

    c = MlflowClient(server.uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key, f in ((names.TRAIN_LOSS, lambda s: 10.0 / s), (names.FLOPS, lambda s: 1e12 * s),
                   ("train/lr", lambda s: 1e-4 * s)):
        hist = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(1, 201)), key
        assert [m.value for m in hist] == pytest.approx([f(s) for s in range(1, 201)])
    assert {a.path for a in c.list_artifacts(run_id, "plots")} == {"plots/loss_vs_flops.png"}


def test_server_down_at_the_end_spools_and_the_resumed_run_delivers(tmp_path, mlflow_server_factory, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    server = mlflow_server_factory().start()
    cfg = _cfg(tmp_path, server.uri)
    tr = Tracker(cfg, 0, 1)
    run_id = tr.run_id
    worst = [0.0]
    _log(tr, range(1, 21), worst)
    server.stop()
    _log(tr, range(21, 41), worst)
    t0 = time.monotonic()
    assert tr.close(status="KILLED", timeout=3.0) is False    # preempted during the outage
    assert time.monotonic() - t0 < 15
    assert (tmp_path / "run" / "tracking_spool.jsonl").is_file()
    server.start()
    resumed = Tracker(cfg, 0, 1, resume_run_id=run_id)       # the restarted job, run id from its checkpoint
    assert resumed.run_id == run_id
    _log(resumed, range(41, 61), worst)
    assert resumed.close() is True
    c = MlflowClient(server.uri)
    assert [m.step for m in sorted(c.get_metric_history(run_id, names.TRAIN_LOSS), key=lambda m: m.step)] \
        == list(range(1, 61))
    assert c.get_run(run_id).info.status == "FINISHED"
    assert len(c.search_runs([c.get_run(run_id).info.experiment_id])) == 1
