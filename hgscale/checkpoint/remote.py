"""Checkpoints on object storage: node-local staging, background upload, a ``latest`` that only moves forward
once every rank's files are up, remote pruning, and per-rank downloads on resume.

    store = RemoteCheckpoints(cfg, rank, world_size)   # checkpoint.dir = s3://bucket/run (data.s3_* and AWS_*)
    root = store.stage()             # this rank's empty staging root; DeepSpeed and we write root/tag/ there
    store.upload(tag)                # returns at once; a thread uploads while training goes on
    store.wait()                     # back-pressure before the next save, and at the end of the run

Remote layout (the same as a local checkpoint directory, see hgscale.checkpoint.layout):

    s3://bucket/run/latest                     tag of the newest complete checkpoint, written last
    s3://bucket/run/step00000010/...           every rank's files
    s3://bucket/run/step00000010/.uploaded/<attempt>/rank00003   one empty marker per rank, after its files
    s3://bucket/run/step00000010/COMPLETE      rank 0, once the markers of ranks 0..W-1 of this attempt are there
                                               (it holds the attempt id); then ``latest``, then pruning

Every job attempt has its own id (rank 0's, shared at start-up). Before a save rank 0 clears the remote tag, so a
checkpoint never mixes the files of two attempts: an attempt killed mid-upload leaves its files and markers behind,
and a requeued attempt reaching the same step (on any layout) removes them before its ranks upload. A step
directory without COMPLETE is never resumed from; rank 0 removes such debris after the next complete checkpoint.
A resume on another layout converts once (rank 0) and uploads the conversion as ``<tag>/elastic/`` beside it.

Filesystem, endpoint, retries and credentials come from :mod:`hgscale.core.storage` (one code path with the data
reader): keys stay in the environment, never in an object.
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from pathlib import Path

from hgscale.checkpoint.layout import COMPLETE, CONVERTED, LATEST, META, TAG_RE, UPLOADED
from hgscale.checkpoint.staging import for_conversion, needed, private_dir, source_file, stage_of, staging_root
from hgscale.core import storage
from hgscale.core.storage import StorageError, filesystem, join, storage_options, user_error, with_retries


def is_remote(url: str) -> bool:
    """Object storage (staged and uploaded) rather than a directory every node mounts."""
    return "://" in url and url.split("://", 1)[0].lower() in ("s3", "s3a")


class RemoteCheckpoints:
    def __init__(self, cfg, rank: int, world_size: int, attempt: str = ""):
        self.url, self.rank, self.world, self.attempt = cfg.checkpoint.dir.rstrip("/"), rank, world_size, attempt
        self.keep_last = max(cfg.checkpoint.keep_last, 1)
        # completing a multi-GB multipart upload can take minutes server-side: a data-sized read timeout would
        # abort finished uploads
        self.opts = storage_options(cfg.data, timeout_s=max(cfg.data.request_timeout_s, 600.0))
        self.fs, self.path = filesystem(self.url, self.opts)
        self.local = staging_root(cfg, rank)
        self.cfg_staging = cfg.checkpoint.staging_dir
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.progress_t = time.monotonic()  # last file uploaded: the watchdog counts uploads as progress

    # --------------------------------------------------------------------------------- start-up checks
    def problems(self) -> list[str]:
        """Why checkpoints cannot go to checkpoint.dir (bucket, credentials, staging dir), checked before any
        process group starts."""
        out = []
        try:
            if not self.cfg_staging:  # our default base: private to this user (a chosen one is the user's call)
                private_dir(self.local.parents[1])
            self.local.mkdir(parents=True, exist_ok=True)
            probe = self.local / f".write-test-{self.rank}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except StorageError as e:
            out.append(str(e))
        except OSError as e:
            out.append(f"checkpoint.staging_dir {str(self.local.parents[1])!r} is not writable ({e.strerror}): set "
                       f"checkpoint.staging_dir to a node-local directory with room for one checkpoint per node")
        bucket = self.path.split("/", 1)[0]

        def list_bucket():
            try:
                return self.fs.ls(bucket, detail=False, refresh=True)
            except FileNotFoundError:
                raise StorageError(f"checkpoint.dir = {self.url!r}: bucket {bucket!r} does not exist (or these "
                                f"credentials cannot see it): create it, or fix checkpoint.dir and "
                                f"data.s3_endpoint_url") from None
        try:
            self._call(list_bucket, "list")
            if self.rank == 0:  # a key that may list but not write would fail at the first save
                probe = join(self.path, f".write-test-{time.time_ns()}")
                self._call(lambda: self.fs.pipe_file(probe, b""), "write to")
                self._call(lambda: self.fs.rm_file(probe), "delete from")
        except storage.StorageUnavailable:  # an outage is no problem of the config: raised, exit INFRA (requeued)
            raise
        except StorageError as e:
            out.append(str(e))
        return out

    def _call(self, fn, what: str):
        try:
            return with_retries(self.url, fn, self.opts, what=what)
        except StorageError as e:  # the same kind (an outage stays StorageUnavailable: exit INFRA, requeued)
            raise type(e)(str(e) if str(e).startswith("checkpoint.dir") else f"checkpoint.dir: {e}") from None
        except OSError as e:
            err = user_error(self.url, e, what) or StorageError(f"cannot {what} {self.url}: {type(e).__name__}: {e}")
            raise type(err)(f"checkpoint.dir: {err}") from None

    # --------------------------------------------------------------------------------- reading
    def complete_tags(self) -> list[str]:
        self.fs.invalidate_cache()  # other ranks and jobs write here: no stale listings
        found = self._call(lambda: self.fs.glob(join(self.path, f"step*/{COMPLETE}")), "list")
        tags = {p.rstrip("/").split("/")[-2] for p in found}
        return sorted((t for t in tags if TAG_RE.match(t)), key=lambda t: int(TAG_RE.match(t).group(1)))

    def _named(self) -> str | None:
        """The tag ``latest`` names, None if there is no ``latest``."""
        try:
            return self._call(lambda: self.fs.cat_file(join(self.path, LATEST)), "read").decode().strip()
        except StorageError:
            return None

    def candidates(self) -> list[str]:
        """Complete tags, newest first, the one ``latest`` names (if complete) at the front."""
        tags, named = self.complete_tags()[::-1], self._named()
        return [named] + [t for t in tags if t != named] if named in tags else tags

    def latest(self) -> str | None:
        """The tag ``latest`` names if it is complete, else the newest complete one, else None."""
        tags = self.candidates()
        return tags[0] if tags else None

    def fetch_meta(self, tag: str) -> Path:
        """hgscale.json of ``tag`` into this rank's staging (the layout check reads it before any process group)."""
        dest = self.local / tag / META
        if not self.cfg_staging:
            private_dir(self.local.parents[1])
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._call(lambda: self.fs.get_file(join(self.path, f"{tag}/{META}"), str(dest)), "download")
        return dest

    def download(self, tag: str, meta: dict, converted: bool = False) -> Path:
        """The files this rank reads on resume (of a conversion, with ``converted``: :func:`for_conversion` and the
        conversion directory); returns this rank's staging root."""
        stage, layers = stage_of(meta, self.rank)
        if converted:
            self._get_files(tag, for_conversion)
            self._get_tree(f"{tag}/{CONVERTED}", self.local / tag / CONVERTED)
        else:
            self._get_files(tag, lambda n: needed(n, self.rank, stage, layers))
        return self.local

    def file_names(self, tag: str) -> set[str]:
        """The names of the files directly under remote ``tag`` (not its pseudo-directories)."""
        self.fs.invalidate_cache()
        entries = self._call(lambda: self.fs.ls(join(self.path, tag), detail=True), "list")
        return {e["name"].rstrip("/").split("/")[-1] for e in entries if e.get("type") == "file"}

    def _get_files(self, tag: str, wanted) -> None:
        """The files of remote ``tag`` whose name ``wanted`` takes (never the pseudo-directories), into staging."""
        dest = self.local / tag
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(self.file_names(tag)):
            if wanted(name) and not (dest / name).is_file():
                self._call(lambda n=name: self.fs.get_file(join(self.path, f"{tag}/{n}"), str(dest / n)), "download")

    def _get_tree(self, rel: str, dest: Path) -> None:
        """Every object under remote ``rel`` into ``dest`` (a conversion: its params, then elastic.json)."""
        self.fs.invalidate_cache()
        base = join(self.path, rel)
        for f in sorted(self._call(lambda: self.fs.find(base), "list")):
            out = dest / f[len(base):].lstrip("/")
            out.parent.mkdir(parents=True, exist_ok=True)
            self._call(lambda f=f, out=out: self.fs.get_file(f, str(out)), "download")

    def remote_conversion(self, tag: str) -> bool:
        """Whether a finished conversion of ``tag`` is on the store (its elastic.json is uploaded last)."""
        return self._exists(join(self.path, f"{tag}/{CONVERTED}/elastic.json"))

    def share_conversion(self, tag: str, build, say=print) -> Path:
        """Before any process group: the conversion of ``tag`` in this rank's staging. The store's, if it has one
        (a later resume reuses it); else rank 0 downloads the checkpoint, builds it with ``build(tag_dir)`` and
        uploads it (elastic.json last), while the other ranks wait for it on the store."""
        local = self.local / tag / CONVERTED
        where = f"{self.url}/{tag}/{CONVERTED}"
        if not self.remote_conversion(tag):
            if self.rank == 0:
                t0 = time.perf_counter()
                self._get_files(tag, source_file)
                build(self.local / tag)
                for f in sorted(p for p in local.rglob("*") if p.is_file() and p.name != "elastic.json"):
                    self._put(f, f"{tag}/{CONVERTED}/{f.relative_to(local).as_posix()}")
                self._put(local / "elastic.json", f"{tag}/{CONVERTED}/elastic.json")
                say(f"converted {tag} for this layout and uploaded it to {where} in "
                    f"{time.perf_counter() - t0:.1f} s", flush=True)
                return local
            while not self.remote_conversion(tag):  # rank 0 converts; a launcher ends this rank if rank 0 dies
                time.sleep(1.0)
        elif self.rank == 0:
            say(f"reusing the conversion of {tag} at {where}", flush=True)
        if not (local / "elastic.json").is_file():
            self._get_tree(f"{tag}/{CONVERTED}", local)
        return local

    def _put(self, f: Path, rel: str) -> None:
        self._call(lambda: self.fs.put_file(str(f), join(self.path, rel)), "upload to")
        self.progress_t = time.monotonic()

    def drop_local(self, tag: str) -> None:
        shutil.rmtree(self.local / tag, ignore_errors=True)

    # --------------------------------------------------------------------------------- writing
    def stage(self) -> Path:
        """An empty staging root, once the previous upload is done (the loop waits here only if uploads are slower
        than checkpoint.interval); raises an earlier upload's error."""
        self.wait()
        if not self.cfg_staging:
            private_dir(self.local.parents[1])
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        return self.local

    def upload(self, tag: str) -> None:
        """Upload this rank's staged ``tag`` in the background; rank 0 then completes it once every rank has."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="hgscale-upload", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._jobs.put(tag)

    def wait(self, timeout: float | None = None) -> bool:
        """Until the queued uploads are done (True) or ``timeout`` passed (False); raises an upload error."""
        done = self._idle.wait(timeout)
        self.raise_error()
        return done

    def raise_error(self) -> None:
        if self._error is not None:
            # credentials or a bucket the user must fix stay a StorageError; anything else that failed after the
            # retries (an outage, a dropped connection, a full staging disk) is infrastructure: requeued
            err = self._error
            user = isinstance(err, StorageError) and not isinstance(err, storage.StorageUnavailable)
            kind = StorageError if user else storage.StorageUnavailable
            raise kind(f"checkpoint upload to {self.url} failed: {err}")

    def _work(self) -> None:
        while True:
            tag = self._jobs.get()
            try:
                self._upload_one(tag)
                if self.rank == 0:
                    self._complete(tag)
                self.drop_local(tag)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread at the next save or the end
                self._error = e
            finally:
                if self._jobs.empty():
                    self._idle.set()

    def _upload_one(self, tag: str) -> None:
        src = self.local / tag
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            self._put(f, f"{tag}/{f.relative_to(src).as_posix()}")
        self._call(lambda: self.fs.pipe_file(self._marker(tag, self.rank), b""), "upload to")

    def _marker(self, tag: str, rank: int) -> str:
        return join(self.path, f"{tag}/{UPLOADED}/{self.attempt}/rank{rank:05d}")

    def clear(self, tag: str) -> None:
        """Rank 0, before a save of ``tag`` (and before any rank uploads): remove what an earlier attempt left
        under it, so the checkpoint holds this attempt's files only."""
        target = join(self.path, tag)
        if not self._exists(target):
            return
        if self._named() == tag:  # a resume that skipped a corrupt newer checkpoint saves this step again: latest
            older = [t for t in self.complete_tags() if t != tag]  # must not name it while it is rewritten
            if older:
                self._call(lambda: self.fs.pipe_file(join(self.path, LATEST), older[-1].encode()), "upload to")
            else:
                self._call(lambda: self.fs.rm_file(join(self.path, LATEST)), "delete from")
        self._call(lambda: self.fs.rm(target, recursive=True), "delete from")
        self.fs.invalidate_cache(target)

    def _complete(self, tag: str, poll_s: float = 0.5) -> None:
        """Rank 0: the markers of exactly ranks 0..W-1 of this attempt, then COMPLETE, then ``latest``, then pruning.
        Waits as long as ranks are uploading; a rank that died leaves the checkpoint incomplete, and the job's end
        stops this thread."""
        marks = join(self.path, f"{tag}/{UPLOADED}/{self.attempt}")
        want = {f"rank{r:05d}" for r in range(self.world)}
        seen = 0
        while True:
            have = {p.rstrip("/").split("/")[-1] for p in self._call(
                lambda: self.fs.ls(marks, detail=False, refresh=True), "list")} if self._exists(marks) else set()
            if want <= have:
                break
            if len(have & want) > seen:  # another rank finished: progress (a frozen rank's marker never comes)
                seen, self.progress_t = len(have & want), time.monotonic()
            time.sleep(poll_s)
        self._call(lambda: self.fs.pipe_file(join(self.path, f"{tag}/{COMPLETE}"), self.attempt.encode()),
                   "upload to")
        self._call(lambda: self.fs.pipe_file(join(self.path, LATEST), tag.encode()), "upload to")
        self._prune(keep=tag)

    def _exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return self._call(lambda: self.fs.exists(path), "list")

    def _prune(self, keep: str) -> None:
        """keep_last complete checkpoints; older incomplete ones are debris of killed saves."""
        complete = self.complete_tags()
        doomed = [t for t in complete[:-self.keep_last] if t != keep]
        newest = int(TAG_RE.match(keep).group(1))
        self.fs.invalidate_cache(self.path)
        for p in self._call(lambda: self.fs.ls(self.path, detail=False), "list"):
            name = p.rstrip("/").split("/")[-1]
            m = TAG_RE.match(name)
            if m and name not in complete and int(m.group(1)) < newest:
                doomed.append(name)
        for t in doomed:
            self._call(lambda t=t: self.fs.rm(join(self.path, t), recursive=True), "delete from")


def remote_resume_point(cfg, warn=print) -> tuple[Path, str] | None:
    """(this rank's staging root, tag) of the newest complete checkpoint at checkpoint.dir whose hgscale.json reads
    (a corrupt one is skipped, named by ``warn``), that file downloaded; None if there is none. Runs before any
    process group: every storage problem (bucket, credentials, staging dir) is raised here as a StorageError naming
    the URL and the fix."""
    from hgscale.checkpoint.layout import newest_readable, read_meta

    store = RemoteCheckpoints(cfg, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    tag = newest_readable(store.candidates(), lambda t: read_meta(store.fetch_meta(t).parent), warn)
    return (store.local, tag) if tag else None


def start_up_problems(cfg) -> list[str]:
    """Bucket, credentials and staging dir of a remote checkpoint.dir, checked before any process group."""
    if not is_remote(cfg.checkpoint.dir):
        return []
    return RemoteCheckpoints(cfg, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))).problems()
