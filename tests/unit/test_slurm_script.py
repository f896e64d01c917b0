"""slurm/train_multinode.sh and slurm/prepare.sh decisions without a cluster: each script runs under bash with fake
srun / scontrol / sinfo / sleep on PATH and a Python wrapper whose preflight passes at once, so what is checked is
the script's own logic: numbers from the environment and the restart-count file parsed as non-negative integers
(never evaluated), exit statuses read from ``python -m hgscale.core.status``, and the requeue after a crash, a
hang (culprit node excluded) or an outage (INFRA: no node excluded). tests/integration/test_slurm_*.py run the
same scripts on a real Slurm cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hgscale.core.status import HANG, INFRA, NAN, USER_ERROR
from launchers.faults import attempt_status, culprit, main, stop_status

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "slurm" / "train_multinode.sh"
PREPARE = REPO / "slurm" / "prepare.sh"
JOB = "4242"

FAKES = {
    # srun: the ranks' step. Copies the records the test prepared into the attempt's events dir, exits as told.
    "srun": 'echo "srun $*" >> "$FAKE_LOG"\n'
            'if [ -n "${FAKE_EVENTS:-}" ]; then cp "$FAKE_EVENTS"/* "$HGSCALE_EVENTS_DIR"/; fi\n'
            'exit "${FAKE_SRUN_RC:-0}"\n',
    "scontrol": 'echo "scontrol $*" >> "$FAKE_LOG"\n'
                'if [ "$1 $2" = "show job" ]; then echo "JobId=$3 ExcNodeList=(null) Restarts=0"; fi\n',
    "sinfo": 'printf "n1\\nn2\\nn3\\n"\n',
    "sleep": 'echo "sleep $*" >> "$FAKE_LOG"\n',
    # the Python the script runs: preflight passes (or exits as told), the status list may be replaced, the rest is
    # the real interpreter
    "python": 'if [ "$1 $2" = "-m launchers.preflight" ]; then exit "${FAKE_PREFLIGHT_RC:-0}"; fi\n'
              'if [ "$1 $2" = "-m hgscale.core.status" ] && [ -n "${FAKE_STATUS_OUT:-}" ]; then\n'
              '    printf "%s\\n" "$FAKE_STATUS_OUT"; exit 0\nfi\n'
              'if [ "$1 $2" = "-m data_pipelines.text" ] || [ "$1 $2" = "-m data_pipelines.merge" ]; then\n'
              '    echo "python $*" >> "$FAKE_LOG"; exit 0\nfi\n'
              f'exec {sys.executable} "$@"\n',
}


@pytest.fixture
def fake(tmp_path):
    """bin/ with the fakes, a config file, the state dir; returns a runner of either script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "c.json").write_text("{}")
    events = tmp_path / "events"
    events.mkdir()

    class Fake:
        root, log, state = tmp_path, tmp_path / "calls.log", tmp_path / "state"
        job_state = state / f"job-{JOB}"

        def record(self, name: str, doc: dict) -> None:
            """A record a rank (or the watchdog) writes during the attempt: the fake srun puts it in place."""
            (events / name).write_text(json.dumps(doc))

        def calls(self) -> list[str]:
            return self.log.read_text().splitlines() if self.log.exists() else []

        def run(self, script: Path = TRAIN, args=None, **env) -> subprocess.CompletedProcess:
            base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_LOG": str(self.log),
                    "FAKE_EVENTS": str(events) if any(events.iterdir()) else "",
                    "HGSCALE_PYTHON": str(bin_dir / "python"), "SLURM_SUBMIT_DIR": str(tmp_path),
                    "HGSCALE_STATE_DIR": str(self.state)}
            if script == TRAIN:
                base["SLURM_JOB_ID"] = JOB
            argv = args if args is not None else ([str(tmp_path / "c.json")] if script == TRAIN else
                                                  ["--input", "in/*.txt", "--out", str(tmp_path / "ds")])
            return subprocess.run(["bash", str(script), *argv], env={**base, **env}, capture_output=True, text=True,
                                  timeout=60, cwd=tmp_path)

    return Fake()


def _one_error_line(r: subprocess.CompletedProcess, prefix: str = "hgscale: error: ") -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------ numbers from outside

@pytest.mark.parametrize("var, value", [
    ("HGSCALE_MAX_RESTARTS", "$(touch PWNED)"),
    ("HGSCALE_MAX_RESTARTS", "a[$(touch PWNED)]"),   # an array subscript: arithmetic would run it
    ("HGSCALE_MAX_RESTARTS", "three"),               # `[ 0 -ge three ]` is false: requeues would never end
    ("HGSCALE_MAX_RESTARTS", "-1"),
    ("HGSCALE_RESTART_BACKOFF_S", "1.5"),
    ("HGSCALE_RESTART_BACKOFF_S", "30 "),
    ("HGSCALE_RESTART_BACKOFF_S", "$(touch PWNED)"),
    ("HGSCALE_MAX_REQUEUES", "1e3"),
    ("HGSCALE_MAX_REQUEUES", "99999999999"),         # more than 10 digits
    ("SLURM_RESTART_COUNT", "0x10"),
    ("SLURM_JOB_NUM_NODES", "2\n3"),
    ("SLURM_JOB_ID", "42/../x"),
])
def test_a_bad_number_from_the_environment_stops_the_job_with_one_line(fake, var, value):
    r = fake.run(**{var: value})
    assert r.returncode == USER_ERROR, r.stderr
    line = _one_error_line(r)
    assert f"{var} = '" in line and "is not a non-negative integer" in line
    assert not (fake.root / "PWNED").exists()       # the text was never evaluated
    assert not any(c.startswith("srun") for c in fake.calls())  # no rank started


def test_good_numbers_pass_leading_zeros_are_decimal(fake):
    r = fake.run(HGSCALE_MAX_RESTARTS="08", HGSCALE_RESTART_BACKOFF_S="09", SLURM_RESTART_COUNT="0")
    assert r.returncode == 0, r.stderr
    assert "finished at" in r.stdout and any(c.startswith("srun") for c in fake.calls())


def test_a_damaged_restart_count_file_is_refused(fake):
    fake.job_state.mkdir(parents=True)
    (fake.job_state / "failures").write_text("2; rm -rf ~\n")
    r = fake.run()
    assert r.returncode == USER_ERROR
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "is not a non-negative integer" in lines[0], r.stderr  # the value, then the fix
    assert f"{fake.job_state}/failures is damaged; delete it" in lines[1]
    assert fake.calls() == []


# ------------------------------------------------------------------------------------------ exit statuses

@pytest.mark.parametrize("out, needle", [
    ("OK=0\nUSER_ERROR=2\nNAN=$(touch PWNED)\nHANG=4\nINFRA=5", "hgscale.core.status NAN = '$(touch PWNED)'"),
    ("OK=0\nUSER_ERROR=2\nNAN=3\nHANG=4", "does not name every exit status"),
    ("OK=0\nUSER_ERROR=2\nNAN=3\nHANG=4\nINFRA=5=6", "hgscale.core.status INFRA = '5=6'"),
])
def test_exit_statuses_are_read_from_hgscale_core_status_and_checked(fake, out, needle):
    r = fake.run(FAKE_STATUS_OUT=out)
    assert r.returncode == USER_ERROR and needle in _one_error_line(r)
    assert not (fake.root / "PWNED").exists() and fake.calls() == []


def test_the_statuses_the_module_names_are_the_ones_the_script_acts_on(fake):
    """With INFRA renumbered to 7 (and 5 made a plain crash), a step that exits 7 is an outage: requeued, no node
    excluded, though a crash record names a host."""
    fake.record("crash-rank00001.json", {"kind": "crash", "rank": 1, "host": "n2", "status": 1, "time": 1.0})
    r = fake.run(FAKE_STATUS_OUT="OK=0\nUSER_ERROR=2\nNAN=3\nHANG=4\nINFRA=7", FAKE_SRUN_RC="7",
                 HGSCALE_RESTART_BACKOFF_S="0")
    assert r.returncode == 0, r.stderr
    assert "exit status 7" in r.stdout and "no node is excluded" in r.stdout
    assert f"scontrol requeue {JOB}" in fake.calls() and not any("ExcNodeList=" in c for c in fake.calls())


# ---------------------------------------------------------------------------------------------- requeues

def test_an_outage_requeues_with_back_off_and_excludes_no_node(fake):
    """A rank exits INFRA (storage unreachable after retries); srun reports 137 for the ranks it killed: the
    records decide, the job requeues after the back-off, and the node of that rank is not excluded."""
    fake.record("crash-rank00001.json", {"kind": "crash", "rank": 1, "host": "n2", "status": INFRA, "time": 1.0})
    fake.record("crash-rank00000.json", {"kind": "crash", "rank": 0, "host": "n1", "status": 1, "time": 9.0})
    r = fake.run(FAKE_SRUN_RC="137", HGSCALE_RESTART_BACKOFF_S="7")
    assert r.returncode == 0, r.stderr
    assert f"exit status {INFRA}" in r.stdout and "no node is excluded" in r.stdout
    assert "(restart 1/3 after failures) in 7 s" in r.stdout
    calls = fake.calls()
    assert "sleep 7" in calls and calls[-1] == f"scontrol requeue {JOB}"
    assert not any("ExcNodeList=" in c for c in calls) and not any("show job" in c for c in calls)
    assert (fake.job_state / "failures").read_text().strip() == "1"


@pytest.mark.parametrize("status", [USER_ERROR, INFRA])
def test_a_failed_preflight_ends_the_job_with_its_status(fake, status):
    """Preflight checks what a requeue would not change (the config, the rendezvous address): no rank, no requeue."""
    r = fake.run(FAKE_PREFLIGHT_RC=str(status))
    assert r.returncode == status
    assert f"preflight failed (exit status {status}); no rank was started" in r.stderr
    assert fake.calls() == []


def test_a_crash_requeues_excluding_the_node_that_failed_first_with_doubled_back_off(fake):
    fake.job_state.mkdir(parents=True)
    (fake.job_state / "failures").write_text("2\n")
    fake.record("crash-rank00003.json", {"kind": "crash", "rank": 3, "host": "n2", "status": 139, "time": 2.0})
    r = fake.run(FAKE_SRUN_RC="139", HGSCALE_RESTART_BACKOFF_S="7")
    assert r.returncode == 0, r.stderr
    assert "the ranks failed (srun exit status 139)" in r.stdout
    assert "(restart 3/3 after failures) in 28 s" in r.stdout             # 7 x 2^2
    calls = fake.calls()
    # Slurm refuses ExcNodeList for a running job: requeued held, updated while it waits, released
    assert calls[-4:] == ["sleep 28", f"scontrol requeuehold {JOB}", f"scontrol update JobId={JOB} ExcNodeList=n2",
                          f"scontrol release {JOB}"]


@pytest.mark.parametrize("min_nodes, update", [
    ("2", f"scontrol update JobId={JOB} ExcNodeList=n2 NumNodes=2 NumTasks=8"), (None, None)])
def test_a_job_on_every_node_of_the_partition_shrinks_to_its_minimum_or_excludes_none(fake, min_nodes, update):
    """3 nodes of 4 tasks, all of the partition: a node that crashed can only be left out if the job may run on 2
    (HGSCALE_MIN_NODES=2); then it is requeued on 2 nodes (8 tasks), which resume on that layout."""
    fake.record("crash-rank00005.json", {"kind": "crash", "rank": 5, "host": "n2", "status": 137, "time": 1.0})
    env = {"SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS_PER_NODE": "4", "HGSCALE_RESTART_BACKOFF_S": "0"}
    r = fake.run(FAKE_SRUN_RC="137", **env, **({"HGSCALE_MIN_NODES": min_nodes} if min_nodes else {}))
    assert r.returncode == 0, r.stderr
    calls = fake.calls()
    if update:
        assert "it runs on 2 node(s) instead of 3 (HGSCALE_MIN_NODES=2)" in r.stdout
        assert calls[-3:] == [f"scontrol requeuehold {JOB}", update, f"scontrol release {JOB}"]
    else:
        assert "not excluding node n2: the partition has 3 node(s) and the job needs 3" in r.stdout
        assert calls[-1] == f"scontrol requeue {JOB}" and not any("ExcNodeList=" in c for c in calls)


def test_a_hang_excludes_the_culprit_and_the_back_off_is_capped(fake):
    fake.job_state.mkdir(parents=True)
    (fake.job_state / "failures").write_text("1")
    fake.record("hang.json", {"kind": "hang", "ranks": [2], "culprit_hosts": ["n3.cluster"]})
    r = fake.run(FAKE_SRUN_RC=str(HANG), HGSCALE_RESTART_BACKOFF_S="500")
    assert r.returncode == 0, r.stderr
    assert "the ranks hung" in r.stdout and "in 600 s" in r.stdout         # 1000, capped
    assert f"scontrol update JobId={JOB} ExcNodeList=n3" in fake.calls()


def test_the_restart_cap_holds(fake):
    fake.job_state.mkdir(parents=True)
    (fake.job_state / "failures").write_text("1")
    r = fake.run(FAKE_SRUN_RC="1", HGSCALE_MAX_RESTARTS="1")
    assert r.returncode == 1
    assert "restarted 1 time(s) after failures already (HGSCALE_MAX_RESTARTS=1); not requeueing" in r.stderr
    assert not any("requeue" in c for c in fake.calls())


@pytest.mark.parametrize("status", [USER_ERROR, NAN])
def test_a_deliberate_stop_is_not_requeued(fake, status):
    fake.record("stop-rank00000.json", {"kind": "stop", "rank": 0, "host": "n1", "status": status, "time": 1.0})
    r = fake.run(FAKE_SRUN_RC="143")
    assert r.returncode == status
    assert f"the ranks failed (srun exit status {status})" in r.stderr
    assert not any("requeue" in c for c in fake.calls())


def test_preemption_requeue_cap_reads_checked_numbers(fake):
    r = fake.run(SLURM_RESTART_COUNT="5", HGSCALE_MAX_REQUEUES="5", FAKE_SRUN_RC="0")
    assert r.returncode == 0 and "finished at" in r.stdout  # not preempted: the cap does not apply


# ------------------------------------------------------------------------------------------- prepare.sh

@pytest.mark.parametrize("var, value", [
    ("SLURM_ARRAY_TASK_ID", "$(touch PWNED)"),
    ("SLURM_ARRAY_TASK_MIN", "-1"),
    ("HGSCALE_NUM_TASKS", "a[$(touch PWNED)]"),
    ("SLURM_CPUS_PER_TASK", "8cpus"),
])
def test_prepare_refuses_a_bad_number_with_one_line(fake, var, value):
    r = fake.run(PREPARE, **{"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", var: value})
    assert r.returncode == USER_ERROR
    assert f"{var} = '" in _one_error_line(r, "hgscale-prepare: error: ")
    assert not (fake.root / "PWNED").exists() and fake.calls() == []


def test_prepare_derives_its_task_from_checked_numbers(fake):
    r = fake.run(PREPARE, SLURM_ARRAY_TASK_ID="12", SLURM_ARRAY_TASK_MIN="10", SLURM_ARRAY_TASK_MAX="13",
                 SLURM_CPUS_PER_TASK="03")
    assert r.returncode == 0, r.stderr
    text = [c for c in fake.calls() if "data_pipelines.text" in c]
    assert text and text[0].endswith("--num-tasks 4 --task-index 2 --workers 3"), text
    r = fake.run(PREPARE, SLURM_ARRAY_TASK_ID="7", HGSCALE_NUM_TASKS="4")
    assert r.returncode == USER_ERROR and "array task 7 is not one of the 4 task(s)" in _one_error_line(
        r, "hgscale-prepare: error: ")


# ---------------------------------------------------------------------------------------- launchers.faults

def _write(d: Path, name: str, doc) -> None:
    (d / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))


def test_faults_status_names_an_outage_and_blames_no_node(tmp_path, capsys):
    _write(tmp_path, "crash-rank00001.json", {"kind": "crash", "rank": 1, "host": "n2", "status": INFRA, "time": 1.0})
    _write(tmp_path, "crash-rank00000.json", {"kind": "crash", "rank": 0, "host": "n1", "status": 1, "time": 5.0})
    assert attempt_status(tmp_path) == INFRA and culprit(tmp_path) is None and stop_status(tmp_path) is None
    assert main(["status", str(tmp_path)]) == 0 and capsys.readouterr().out == f"{INFRA}\n"
    _write(tmp_path, "stop-rank00002.json", {"kind": "stop", "rank": 2, "host": "n1", "status": NAN, "time": 3.0})
    assert attempt_status(tmp_path) == NAN                            # a deliberate stop decides first


def test_faults_leave_out_records_they_cannot_read(tmp_path, capsys):
    _write(tmp_path, "crash-rank00000.json", '{"kind": "crash", "rank": 0, "host": "n1", "sta')   # cut short
    _write(tmp_path, "crash-rank00001.json", {"kind": "crash", "rank": 1, "host": "n2", "status": "9", "time": 1})
    _write(tmp_path, "crash-rank00002.json", ["not", "a", "record"])
    _write(tmp_path, "stop-rank00003.json", {"kind": "stop", "rank": 3, "host": "n1", "status": 137, "time": 1.0})
    _write(tmp_path, "hang.json", '{"culprit_hosts": ["n')
    assert culprit(tmp_path) is None and stop_status(tmp_path) is None and attempt_status(tmp_path) is None
    _write(tmp_path, "hang.json", {"culprit_hosts": "n7"})                # not a list: no culprit from it
    assert culprit(tmp_path) is None
    _write(tmp_path, "crash-rank00004.json", {"kind": "crash", "rank": 4, "host": "n4", "status": 139, "time": 2.0})
    _write(tmp_path, "hang.json", "")
    assert culprit(tmp_path) == "n4"
    for command in ("culprit", "stop-status", "status"):
        assert main([command, str(tmp_path / "missing")]) == 0
    assert capsys.readouterr().out == ""
    assert main(["bogus", str(tmp_path)]) == 2


def test_python_m_launchers_faults_runs(tmp_path):
    _write(tmp_path, "crash-rank00003.json", {"kind": "crash", "rank": 3, "host": "n9", "status": 1, "time": 1.0})
    r = subprocess.run([sys.executable, "-m", "launchers.faults", "culprit", str(tmp_path)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and r.stdout == "n9\n", r.stderr
