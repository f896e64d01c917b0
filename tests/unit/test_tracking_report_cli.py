"""hgscale.tracking.report: user errors are one sentence and leave nothing behind; the markdown table's formatting."""
import socket

import numpy as np

from hgscale.commands import report
from hgscale.tracking.report import markdown


def test_missing_store_is_an_error_and_not_created(tmp_path, capsys):
    db = tmp_path / "nowhere" / "mlflow.db"
    rc = report.main(["--experiment", "x", "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert f"no tracking store at {db}" in capsys.readouterr().err
    assert not db.exists() and not (tmp_path / "out").exists()


def test_no_store_named(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert report.main(["--experiment", "x"]) == 2
    assert "no tracking store given" in capsys.readouterr().err


def test_unreachable_server_is_one_sentence_without_the_password(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = report.main(["--experiment", "x", "--tracking-uri", f"http://hg:hunter2@127.0.0.1:{port}",
                      "--out", str(tmp_path / "out"), "--no-summary-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"tracking store at http://hg:***@127.0.0.1:{port} does not answer" in err and "hunter2" not in err


def test_markdown_table():
    rows = [{"name": "hg", "run_id": "0123456789ab", "status": "FINISHED", "steps": 100, "metric": "bpc",
             "final_val": 1.23456, "best_val": 1.2, "test": None, "tokens_per_s": 12345.6, "mfu": 0.4567,
             "total_flops": 1.5e15, "val": np.array([1.0])}]
    md = markdown("exp", rows, ["/x/val_vs_flops.png"])
    assert "| hg (`01234567`) | FINISHED | 100 | 1.2346 | 1.2000 | — | 12,346 | 45.7% | 1.500e+15 |" in md
    assert "final val bpc" in md and "![val_vs_flops](val_vs_flops.png)" in md
