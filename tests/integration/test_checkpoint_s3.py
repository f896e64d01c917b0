"""Checkpoints on S3 (moto server, authentication on): staged per rank, uploaded in the background, `latest`
moved last, pruned remotely, resumed after kill -9, no secret in any object, bad credentials refused at start-up.
"""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.testing import assert_close

from hgscale.checkpoint.remote import COMPLETE, LATEST, UPLOADED, RemoteCheckpoints
from hgscale.checkpoint.staging import needed
from hgscale.config import config_from_dict
from hgscale.core.status import INFRA, status_of
from hgscale.core.storage import StorageUnavailable
from tests.integration.train_helpers import ROOT, TRAIN, Watched, demo_data, env, metrics, tiny_config  # noqa: F401

pytestmark = pytest.mark.integration
STEPS = 16


def _cmd(cfg, *extra):
    return [sys.executable, "-m", "launchers.local", "--nproc", "2", sys.executable, str(TRAIN), "--config", str(cfg),
            *extra]


def _losses(run_dir) -> dict:
    out = {}
    for rec in metrics(run_dir):
        if "train/loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"  # a resume drops the re-run steps
            out[rec["step"]] = rec["train/loss"]
    return out


def _objects(server, bucket) -> dict:
    c = server.client()
    keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_s3_checkpoints_survive_kill9_and_resume_exactly(tmp_path, demo_data, s3_env):  # noqa: F811
    server = s3_env
    bucket = server.make_bucket()
    sections = dict(train={"steps": STEPS, "log_interval": 1}, checkpoint={"interval": 2, "keep_last": 2})
    ref = tiny_config(tmp_path, demo_data, "ref.json", **sections)
    r = subprocess.run(_cmd(ref), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    want = _losses(tmp_path / "ref_run")

    cfg = tiny_config(tmp_path, demo_data, "s3.json", train=sections["train"],
                      checkpoint={**sections["checkpoint"], "dir": f"s3://{bucket}/run",
                                  "staging_dir": str(tmp_path / "staging")})
    # attempt A: 2 ranks, killed at step 9; B: 1 rank (another layout), killed at step 13; C: 2 ranks, to the end.
    # B and C reach steps whose upload the attempt before them may have left half done.
    one_rank = [sys.executable, str(TRAIN), "--config", str(cfg), "train.grad_accum_steps=4"]
    for cmd, kill_at, resumed in ((_cmd(cfg), 9, None), (one_rank, 13, (2, 9)), (_cmd(cfg), None, (10, 13))):
        run = Watched(cmd, start_new_session=True)
        if kill_at is None:
            assert run.wait(240) == 0, run.tail()
        else:
            run.wait_for_step(kill_at, of=STEPS)
            os.killpg(run.proc.pid, signal.SIGKILL)  # every process of the attempt, mid-step or mid-upload
            run.wait(30)
            time.sleep(1)
        if resumed:
            m = re.search(rf"resumed from s3://{bucket}/run/step(\d+) at step (\d+)", run.text)
            assert m and resumed[0] <= int(m.group(2)) <= resumed[1], run.tail()
            assert "layout changed since step" in run.text, run.tail()
        objs = _objects(server, bucket)
        latest = objs.get(f"run/{LATEST}", b"").decode()
        if latest:  # whatever was interrupted, latest names a checkpoint every rank finished uploading
            assert f"run/{latest}/{COMPLETE}" in objs
        assert_one_attempt_per_complete_tag(objs)
    got = _losses(tmp_path / "s3_run")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_close(torch.tensor([got[s] for s in sorted(got)], dtype=torch.float64),
                 torch.tensor([want[s] for s in sorted(got)], dtype=torch.float64), rtol=1e-6, atol=0)

    objs = _objects(server, bucket)
    tags = sorted({k.split("/")[1] for k in objs if k.startswith("run/step")})
    assert tags == [f"step{STEPS - 2:08d}", f"step{STEPS:08d}"], tags  # keep_last 2, debris pruned remotely
    assert objs[f"run/{LATEST}"].decode() == f"step{STEPS:08d}"
    for key, body in objs.items():
        assert server.secret_key.encode() not in body, key
    assert not any((tmp_path / "s3_ckpt").parent.glob("s3:*"))  # no local folder named after the URL
    assert not list((tmp_path / "staging").rglob("*.pt"))  # staging emptied once uploaded


def assert_one_attempt_per_complete_tag(objs: dict) -> None:
    """Every complete tag holds the markers of exactly ranks 0..W-1 (W: the world its hgscale.json records) of
    exactly one attempt, the one COMPLETE names, and one rank file per rank."""
    import json

    for key, body in objs.items():
        m = re.match(r"run/(step\d+)/COMPLETE$", key)
        if not m:
            continue
        tag, attempt = m.group(1), body.decode()
        world = json.loads(objs[f"run/{tag}/hgscale.json"])["topology"]["world_size"]
        markers = {k for k in objs if k.startswith(f"run/{tag}/{UPLOADED}/")}
        assert markers == {f"run/{tag}/{UPLOADED}/{attempt}/rank{r:05d}" for r in range(world)}, (key, markers)
        assert {k for k in objs if re.match(rf"run/{tag}/rank\d+\.pt$", k)} == \
            {f"run/{tag}/rank{r:05d}.pt" for r in range(world)}, key


def test_latest_only_moves_once_every_rank_uploaded(tmp_path, s3_env):
    """Rank 0 of a 2-rank job uploads a new checkpoint; rank 1's never arrives (killed): latest keeps naming the
    previous complete checkpoint and a resume would pick that one."""
    bucket = s3_env.make_bucket()
    cfg = config_from_dict({"data": {"url": "/d"}, "checkpoint": {"dir": f"s3://{bucket}/run",
                                                                   "staging_dir": str(tmp_path)}})
    ranks = [RemoteCheckpoints(cfg, r, 2, attempt="a1") for r in (0, 1)]
    for step, uploaders in ((2, ranks), (4, ranks[:1])):
        tag = f"step{step:08d}"
        for st in uploaders:
            root = st.stage()
            (root / tag).mkdir()
            (root / tag / f"rank{st.rank:05d}.pt").write_bytes(b"x" * 1000)
            st.upload(tag)
        if step == 2:
            for st in uploaders:
                assert st.wait(30)
    time.sleep(2)  # rank 0's thread is waiting for rank 1's marker of step 4
    objs = _objects(s3_env, bucket)
    assert objs["run/latest"] == b"step00000002" and "run/step00000004/COMPLETE" not in objs
    assert "run/step00000004/rank00000.pt" in objs
    assert ranks[1].latest() == "step00000002"
    assert not ranks[0].wait(0.1)  # still waiting, as it should


def test_resume_reads_only_what_the_rank_needs():
    names = ["hgscale.json", "rank00000.pt", "rank00003.pt", "mp_rank_00_model_states.pt",
             "mp_rank_01_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_01_optim_states.pt", "layer_00-model_states.pt", "layer_05-model_states.pt",
             ".uploaded", "COMPLETE"]
    got = [n for n in names if needed(n, rank=3, stage=1, layers=range(4, 9))]
    assert got == ["hgscale.json", "rank00003.pt", "mp_rank_01_model_states.pt",
                   "zero_pp_rank_1_mp_rank_01_optim_states.pt", "layer_05-model_states.pt"]


def test_bad_credentials_fail_at_start_up_naming_the_url(tmp_path, demo_data, s3_server):  # noqa: F811
    url = f"s3://{s3_server.make_bucket()}/run"
    cfg = tiny_config(tmp_path, demo_data, "bad.json", checkpoint={"dir": url, "staging_dir": str(tmp_path / "st")})
    e = {**env(), **s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-123"}
    r = subprocess.run([sys.executable, str(TRAIN), "--config", str(cfg)], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"checkpoint.dir: cannot list {url}: access denied" in r.stderr, r.stderr
    assert "AWS_SECRET_ACCESS_KEY" in r.stderr and "wrong-secret-123" not in r.stderr
    assert "training " not in r.stdout  # refused before any process group or engine


def test_missing_bucket_and_unwritable_staging_are_start_up_problems(tmp_path, s3_env):
    from hgscale.checkpoint.remote import start_up_problems

    (tmp_path / "file").write_text("a file, not a directory")
    cfg = config_from_dict({"data": {"url": "/d"}, "checkpoint": {"dir": "s3://no-such-bucket-hg/run",
                                                                   "staging_dir": str(tmp_path / "file" / "x")}})
    got = start_up_problems(cfg)
    assert len(got) == 2, got
    assert got[0].startswith(f"checkpoint.staging_dir {str(tmp_path / 'file' / 'x')!r} is not writable"), got
    assert got[1].startswith("checkpoint.dir = 's3://no-such-bucket-hg/run': bucket 'no-such-bucket-hg' does not "
                             "exist"), got
    cfg.checkpoint.dir, cfg.checkpoint.staging_dir = f"s3://{s3_env.make_bucket()}/run", str(tmp_path / "ok")
    assert start_up_problems(cfg) == []


def _stage_and_upload(store, tag: str, payload: bytes = b"x" * 100) -> None:
    import json

    root = store.stage()
    (root / tag).mkdir()
    (root / tag / f"rank{store.rank:05d}.pt").write_bytes(payload)
    if store.rank == 0:
        (root / tag / "hgscale.json").write_text(json.dumps({"topology": {"world_size": store.world}}))
    store.upload(tag)


def test_a_requeued_attempt_never_mixes_with_the_one_before(tmp_path, s3_env):
    """Attempt A (2 ranks) dies with only rank 1's files of step 4 uploaded. Attempt B reaches step 4 on 1 rank
    (another layout), attempt C on 2 ranks (the same layout): each clears the tag before uploading, and latest
    only ever names a tag holding its own attempt's files and markers."""
    bucket = s3_env.make_bucket()
    cfg = config_from_dict({"data": {"url": "/d"}, "checkpoint": {"dir": f"s3://{bucket}/run",
                                                                   "staging_dir": str(tmp_path)}})
    tag = "step00000004"
    a1 = RemoteCheckpoints(cfg, 1, 2, attempt="A")
    _stage_and_upload(a1, tag, b"from A")
    assert a1.wait(30)
    assert "run/step00000004/.uploaded/A/rank00001" in _objects(s3_env, bucket)
    for attempt, world in (("B", 1), ("C", 2)):
        stores = [RemoteCheckpoints(cfg, r, world, attempt=attempt) for r in range(world)]
        stores[0].clear(tag)  # what CheckpointManager.save does on rank 0 before any rank uploads
        for st in stores:
            _stage_and_upload(st, tag, f"from {attempt}".encode())
        for st in stores:
            assert st.wait(30)
        objs = _objects(s3_env, bucket)
        assert objs["run/latest"] == tag.encode() and objs[f"run/{tag}/COMPLETE"] == attempt.encode()
        under = {k: v for k, v in objs.items() if k.startswith(f"run/{tag}/")}
        assert {k for k in under if "/.uploaded/" in k} == {f"run/{tag}/.uploaded/{attempt}/rank{r:05d}"
                                                            for r in range(world)}
        assert {v for k, v in under.items() if k.endswith(".pt")} == {f"from {attempt}".encode()}  # not A's file
        assert_one_attempt_per_complete_tag(objs)


def test_latest_never_names_a_checkpoint_being_saved_again(tmp_path, s3_env):
    """A run that skipped a corrupt newest checkpoint (step 4) resumes from step 2 and saves step 4 again: before
    the old step 4 is cleared, latest moves back to step 2, so at no moment does it name a tag without COMPLETE."""
    bucket = s3_env.make_bucket()
    cfg = config_from_dict({"data": {"url": "/d"}, "checkpoint": {"dir": f"s3://{bucket}/run",
                                                                   "staging_dir": str(tmp_path)}})
    st = RemoteCheckpoints(cfg, 0, 1, attempt="A")
    for tag in ("step00000002", "step00000004"):
        _stage_and_upload(st, tag)
        assert st.wait(30)
    assert _objects(s3_env, bucket)["run/latest"] == b"step00000004"
    again = RemoteCheckpoints(cfg, 0, 1, attempt="B")
    again.clear("step00000004")
    objs = _objects(s3_env, bucket)
    assert objs["run/latest"] == b"step00000002" and not any(k.startswith("run/step00000004/") for k in objs)
    again.clear("step00000002")  # the only complete one: latest goes, rather than name a cleared tag
    assert "run/latest" not in _objects(s3_env, bucket)


def test_a_conversion_is_uploaded_once_and_reused(tmp_path, s3_env):
    bucket = s3_env.make_bucket()
    cfg = config_from_dict({"data": {"url": "/d"}, "checkpoint": {"dir": f"s3://{bucket}/run",
                                                                   "staging_dir": str(tmp_path / "st")}})
    tag = "step00000002"
    src = RemoteCheckpoints(cfg, 0, 1, attempt="A")
    _stage_and_upload(src, tag)
    assert src.wait(30)
    built = []

    def build(tag_dir):
        conv = tag_dir / "elastic"
        (conv / "params").mkdir(parents=True)
        (conv / "params" / "w.pt").write_bytes(b"w")
        (conv / "elastic.json").write_text("{}")
        built.append(tag_dir)

    rank0 = RemoteCheckpoints(cfg, 0, 2)
    assert (rank0.share_conversion(tag, build) / "params" / "w.pt").read_bytes() == b"w" and len(built) == 1
    assert rank0.remote_conversion(tag)
    rank1 = RemoteCheckpoints(cfg, 1, 2)  # waits for, then downloads, rank 0's conversion
    assert (rank1.share_conversion(tag, build) / "params" / "w.pt").read_bytes() == b"w"
    later = config_from_dict({"data": {"url": "/d"}, "checkpoint": {"dir": f"s3://{bucket}/run",
                                                                     "staging_dir": str(tmp_path / "later")}})
    RemoteCheckpoints(later, 0, 1).share_conversion(tag, build)  # a later resume reuses the uploaded one
    assert len(built) == 1
    objs = _objects(s3_env, bucket)
    assert {"run/step00000002/elastic/elastic.json", "run/step00000002/elastic/params/w.pt"} <= set(objs)
    assert [n for n in ("rank00000.pt", "hgscale.json") if needed(n, 0, 0, None)] == ["rank00000.pt", "hgscale.json"]
    assert not needed("elastic", 0, 0, None)


def test_elastic_resume_from_s3_two_ranks_to_one_and_back(tmp_path, demo_data, s3_env):  # noqa: F811
    """2 ranks save step 4 to S3. 1 rank (accumulation doubled) resumes from it: converts once, uploads the
    conversion beside the checkpoint, and is killed (SIGKILL) at step 6. Run again, it reuses the uploaded
    conversion, and is preempted (SIGUSR1) after step 12. 2 ranks resume from that checkpoint, taken on 1 rank, to
    step 24. At least 10 steps follow each resume, and the 24 losses equal an uninterrupted 2-rank run's (rtol 1e-5)."""
    bucket = s3_env.make_bucket()
    # decay_steps fixes the schedule whatever train.steps each leg runs to
    train = {"steps": 24, "log_interval": 1, "lr_schedule": "cosine", "warmup_steps": 2, "decay_steps": 24}
    ref = tiny_config(tmp_path, demo_data, "eref.json", train=train)
    r = subprocess.run(_cmd(ref), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg = tiny_config(tmp_path, demo_data, "el.json", train=train,
                      checkpoint={"dir": f"s3://{bucket}/run", "interval": 4, "keep_last": 5,
                                  "staging_dir": str(tmp_path / "staging")})
    r = subprocess.run(_cmd(cfg, "train.steps=4"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    one_rank = [sys.executable, str(TRAIN), "--config", str(cfg), "train.grad_accum_steps=4"]
    killed = Watched(one_rank, start_new_session=True)
    killed.wait_for_step(6, of=24)
    os.killpg(killed.proc.pid, signal.SIGKILL)
    killed.wait(30)
    assert f"converted step00000004 for this layout and uploaded it to s3://{bucket}/run/step00000004/elastic" \
        in killed.text, killed.tail()
    preempted = Watched(one_rank)
    preempted.wait_for_step(12, of=24)
    preempted.proc.send_signal(signal.SIGUSR1)
    assert preempted.wait(120) == 0, preempted.tail()
    assert f"reusing the conversion of step00000004 at s3://{bucket}/run/step00000004/elastic" in preempted.text
    assert "converted step00000004" not in preempted.text and "resumed from" in preempted.text, preempted.tail()
    saved = int(re.search(r"preempted at step (\d+); checkpoint saved", preempted.text).group(1))
    assert 12 <= saved <= 14, preempted.tail()  # 10 or more steps follow it
    r = subprocess.run(_cmd(cfg), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"resumed from s3://{bucket}/run/step{saved:08d} at step {saved}" in r.stdout, r.stdout[-2000:]
    assert f"converted step{saved:08d} for this layout" in r.stdout
    want, got = _losses(tmp_path / "eref_run"), _losses(tmp_path / "el_run")
    assert sorted(got) == list(range(1, 25))
    assert_close(torch.tensor([got[s] for s in range(1, 25)], dtype=torch.float64),
                 torch.tensor([want[s] for s in range(1, 25)], dtype=torch.float64), rtol=1e-5, atol=0)
    objs = _objects(s3_env, bucket)  # the conversion was uploaded beside its checkpoint (step 4's is pruned)
    assert f"run/step{saved:08d}/elastic/elastic.json" in objs and "run/step00000004/COMPLETE" not in objs
    assert any(k.startswith(f"run/step{saved:08d}/elastic/params/") for k in objs)


def _slow_save_config(tmp_path, data, name: str, bucket: str, proxy, steps: int, interval: int, slow_s: float):
    """2 ranks checkpointing to S3 through ``proxy``, whose held requests wait ``slow_s``; hang timeout 5 s."""
    proxy.slow_s = slow_s
    return tiny_config(tmp_path, data, f"{name}.json", train={"steps": steps, "log_interval": 1, "hang_timeout_s": 5},
                       checkpoint={"dir": f"s3://{bucket}/run", "interval": interval, "keep_last": 5,
                                   "staging_dir": str(tmp_path / "staging")},
                       data={"s3_endpoint_url": proxy.endpoint_url})


def test_a_save_slower_than_the_hang_timeout_completes(tmp_path, demo_data, s3_env, fault_proxy):  # noqa: F811
    """Every upload request of the first checkpoint is held 8 s by the proxy, longer than train.hang_timeout_s = 5:
    the save (and the next one, which waits for it) is within checkpoint.save_timeout_s, so the job is not taken
    for hung; it finishes with every checkpoint complete."""
    bucket = s3_env.make_bucket()
    cfg = _slow_save_config(tmp_path, demo_data, "slow", bucket, fault_proxy, steps=6, interval=2, slow_s=8.0)
    fault_proxy.inject("slow", count=6, match="step00000002", method="PUT")
    r = subprocess.run(_cmd(cfg), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error: hang" not in r.stderr and fault_proxy.injected["slow"] == 6
    objs = _objects(s3_env, bucket)
    assert {f"run/step{s:08d}/COMPLETE" for s in (2, 4, 6)} <= set(objs)
    assert_one_attempt_per_complete_tag(objs)


def test_a_rank_frozen_inside_a_slow_save_is_caught_and_named(tmp_path, demo_data, s3_env, fault_proxy):  # noqa: F811
    """The upload of step 4 is held 30 s per request, so the save at step 8 waits for it (a slow phase with a budget
    of its own). Rank 1 is stopped (SIGSTOP) inside that wait: its heartbeat stops, and rank 0's watchdog ends the
    job with the hang status within train.hang_timeout_s, naming rank 1; a slow save alone is not a hang."""
    import psutil

    from hgscale.core.status import HANG

    bucket = s3_env.make_bucket()
    cfg = _slow_save_config(tmp_path, demo_data, "frozen", bucket, fault_proxy, steps=8, interval=4, slow_s=30.0)
    fault_proxy.inject("slow", count=50, match="step00000004", method="PUT")
    run = Watched(_cmd(cfg), start_new_session=True)
    try:
        run.wait_for_step(8, of=8)
        time.sleep(2)  # both ranks are in the save of step 8, waiting for step 4's upload
        [rank1] = [p for p in psutil.Process(run.proc.pid).children(recursive=True)
                   if p.environ().get("RANK") == "1" and "train.py" in " ".join(p.cmdline())]
        rank1.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        rc = run.wait(60)
        took = time.monotonic() - frozen_at
    finally:
        with contextlib.suppress(ProcessLookupError):  # a stopped rank left behind
            os.killpg(run.proc.pid, signal.SIGKILL)
    assert rc == HANG and took < 40, run.tail()
    [line] = [ln for ln in run.lines if "error: hang:" in ln]
    assert re.search(r"rank 1 \([^;]+; last heartbeat \d+ s ago in phase '[^']*'\): heartbeat stopped", line), line


def test_an_outage_of_checkpoint_storage_is_infrastructure_not_a_user_error(tmp_path, s3_env, fault_proxy):
    """Object storage that refuses every request (the proxy resets each connection) past the retries: reading
    ``latest``, uploading a checkpoint and the start-up checks all fail as StorageUnavailable, exit status INFRA
    (requeued with back-off), never USER_ERROR (which would stop the job for good); a wrong bucket stays a
    start-up problem of the config."""
    bucket = s3_env.make_bucket()
    cfg = config_from_dict({"data": {"url": "/d", "s3_endpoint_url": fault_proxy.endpoint_url, "retries": 2,
                                     "retry_backoff_s": 0.05},
                            "checkpoint": {"dir": f"s3://{bucket}/run", "staging_dir": str(tmp_path)}})
    st = RemoteCheckpoints(cfg, 0, 1, attempt="A")
    fault_proxy.outage(3600)
    with pytest.raises(StorageUnavailable, match=f"s3://{bucket}/run") as read:
        st.latest()
    _stage_and_upload(st, "step00000002", b"x")
    with pytest.raises(StorageUnavailable, match="checkpoint upload to .* failed") as upload:
        st.wait(60)
    assert status_of(read.value) == status_of(upload.value) == INFRA
    with pytest.raises(StorageUnavailable):  # at start-up too: raised (exit INFRA), not listed as a config problem
        st.problems()
    fault_proxy.outage(0)
    wrong = config_from_dict({"data": {"url": "/d", "s3_endpoint_url": fault_proxy.endpoint_url},
                              "checkpoint": {"dir": f"s3://{bucket}-missing/run", "staging_dir": str(tmp_path)}})
    problems = RemoteCheckpoints(wrong, 0, 1).problems()
    assert len(problems) == 1 and "does not exist" in problems[0], problems
    assert fault_proxy.injected["outage"] >= 4
