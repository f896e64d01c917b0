"""Which node the Slurm script excludes after a failure: the hang report's culprit, else the first rank to die."""
import json

from launchers.faults import culprit, main, record_crash, record_stop, stop_status


def test_first_crash_names_the_node(tmp_path, capsys):
    assert culprit(tmp_path) is None
    for rank, host, t in ((0, "n1", 20.0), (3, "n2", 10.0), (5, "n3", 30.0)):
        (tmp_path / f"crash-rank{rank:05d}.json").write_text(json.dumps(
            {"kind": "crash", "rank": rank, "host": host, "status": 1, "time": t}))
    assert culprit(tmp_path) == "n2"
    assert main(["culprit", str(tmp_path)]) == 0 and capsys.readouterr().out == "n2\n"


def test_hang_report_wins_over_crashes(tmp_path):
    record_crash(0, 137, str(tmp_path))
    (tmp_path / "hang.json").write_text(json.dumps({"kind": "hang", "ranks": [1], "culprit_hosts": ["n7.cluster"]}))
    assert culprit(tmp_path) == "n7"


def test_record_crash_needs_an_events_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("HGSCALE_EVENTS_DIR", raising=False)
    assert record_crash(1, 139) is None
    monkeypatch.setenv("HGSCALE_EVENTS_DIR", str(tmp_path / "ev"))
    rec = json.loads(record_crash(1, 139).read_text())
    assert rec["rank"] == 1 and rec["status"] == 139 and rec["host"]


def test_a_deliberate_stop_is_told_apart_from_the_ranks_killed_with_it(tmp_path, capsys):
    """Rank 0 stops on a data error (2); srun then kills rank 1 (143): the attempt stopped, it did not crash."""
    assert stop_status(tmp_path) is None
    assert main(["stop-status", str(tmp_path)]) == 0 and capsys.readouterr().out == ""
    record_stop(0, 2, str(tmp_path))
    assert stop_status(tmp_path) == 2 and culprit(tmp_path) is None
    assert main(["stop-status", str(tmp_path)]) == 0 and capsys.readouterr().out == "2\n"


def test_an_outage_decides_the_attempt_even_after_a_peer_that_lost_its_rank(tmp_path):
    """Rank 0's upload failed after every retry (INFRA 5); rank 1, waiting in a barrier, lost its peer and exited 1
    a moment before: the attempt is an outage (requeued, no node excluded), not a crash of rank 1's node."""
    from hgscale.core.status import HANG, INFRA, NAN, USER_ERROR, deciding
    from launchers.faults import attempt_status

    for rank, host, status, t in ((1, "n2", 1, 10.0), (0, "n1", INFRA, 10.5)):
        (tmp_path / f"crash-rank{rank:05d}.json").write_text(json.dumps(
            {"kind": "crash", "rank": rank, "host": host, "status": status, "time": t}))
    assert attempt_status(tmp_path) == INFRA and culprit(tmp_path) is None
    assert deciding([1, INFRA, 143]) == INFRA and deciding([143, NAN, INFRA]) == NAN
    assert deciding([1, HANG]) == HANG and deciding([139, 1]) == 139 and deciding([0, 0]) == 0
    assert deciding([INFRA, USER_ERROR]) == USER_ERROR
