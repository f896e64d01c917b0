"""Checkpoints: save, automatic resume, keep-last-N, and export to one safetensors file.

Layout of ``checkpoint.dir``:

    latest                  the tag of the newest complete checkpoint (replaced atomically)
    step00001000/           DeepSpeed's files (model/optimizer/scheduler states, per stage and rank) plus
        hgscale.json        step, tracking run id, resolved config and DeepSpeed JSON (secrets masked), layout
        rank00003.pt        per rank: RNG states, data-stream position of its data-parallel rank, meters
        COMPLETE            written last, after every rank has finished writing

A crash during a save leaves a directory without COMPLETE and ``latest`` still naming the previous
checkpoint; resume only ever reads complete checkpoints and the next successful save removes the debris.
An ``s3://`` checkpoint.dir has the same layout; ranks stage and upload through :mod:`hgscale.checkpoint_store`.

    python -m hgscale.checkpoint export --checkpoint runs/ckpt [--tag step00001000] --out runs/export
    model, cfg = load_exported("runs/export")        # HourglassLM on one device, no DeepSpeed
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hgscale.checkpoint_store import is_remote
from hgscale.config import Config, ConfigError, config_from_dict

_TAG_RE = re.compile(r"^step(\d{8,})$")
COMPLETE, META, LATEST = "COMPLETE", "hgscale.json", "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and the fix."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank{rank:05d}.pt"


def _complete_tags(root: Path) -> list[str]:
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name) and (p / COMPLETE).exists()] \
        if root.is_dir() else []
    return sorted(tags, key=lambda t: int(_TAG_RE.match(t).group(1)))


def latest_tag(root: str | Path) -> str | None:
    """The newest complete checkpoint in ``root``: the one ``latest`` names, else the newest complete one."""
    root = Path(root)
    f = root / LATEST
    if f.is_file():
        tag = f.read_text().strip()
        if (root / tag / COMPLETE).exists():
            return tag
    tags = _complete_tags(root)
    return tags[-1] if tags else None


def resolve(spec: str | Path, default_root: str | Path | None = None) -> tuple[Path, str]:
    """(root, tag) for a checkpoint root (its latest) or one tag directory. Raises CheckpointError."""
    p = Path(spec)
    if (p / COMPLETE).exists():
        return p.parent, p.name
    if p.is_dir():
        tag = latest_tag(p)
        if tag:
            return p, tag
    raise CheckpointError(f"no complete checkpoint at {str(p)!r}: pass a checkpoint directory holding "
                          f"'{LATEST}' or a step directory holding '{COMPLETE}'")


def resume_point(cfg: Config) -> tuple[Path, str] | None:
    """(root, tag) to resume from according to checkpoint.resume ('auto', 'never' or a path), or None.
    Raises CheckpointError for a path that holds no complete checkpoint."""
    spec = cfg.checkpoint.resume
    if spec == "never":
        return None
    if spec == "auto":
        if is_remote(cfg.checkpoint.dir):  # newest complete remote tag, its metadata staged for the layout check
            from hgscale.checkpoint_store import remote_resume_point
            return remote_resume_point(cfg)
        root = Path(cfg.checkpoint.dir)
        tag = latest_tag(root)
        return (root, tag) if tag else None
    return resolve(spec)


def layout_problem(tag_dir: Path, want: dict) -> str | None:
    """Why the checkpoint in ``tag_dir`` cannot be resumed with topology ``want``, or None.
    Stage boundaries count too: each stage's optimizer state only fits the layers it was saved with."""
    have = json.loads((tag_dir / META).read_text())["topology"]
    for key in ("world_size", "pipeline_stages", "zero_stage", "stage_boundaries"):
        if have.get(key) != want.get(key):
            return (f"checkpoint {str(tag_dir)!r} was written with {key} = {have.get(key)}, this run has "
                    f"{want.get(key)}: launch the same layout, or start fresh with checkpoint.resume=never "
                    f"(or export it: python -m hgscale.checkpoint export)")
    return None


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old or the new file, never half of one


class CheckpointManager:
    """Saves and restores a :class:`hgscale.distributed.engine.TrainEngine` with our client state.

    All ranks call :meth:`save` and :meth:`load` together (DeepSpeed's save is collective).
    """

    def __init__(self, cfg: Config, engine, ds_json: dict):
        self.cfg, self.eng, self.ds_json = cfg, engine, ds_json
        self.root = Path(cfg.checkpoint.dir)
        self.rank = engine.rt.rank
        self.remote = None
        if is_remote(cfg.checkpoint.dir):  # each rank writes to node-local staging; a thread uploads it
            from hgscale.checkpoint_store import RemoteCheckpoints
            self.remote = RemoteCheckpoints(cfg, self.rank, engine.rt.world_size)
            self.root = self.remote.local

    def save(self, step: int, rank_state: dict, run_id: str | None, extra: dict | None = None) -> Path:
        tag = tag_for(step)
        if self.remote is not None:
            self.remote.stage()  # after the previous upload: staging holds one checkpoint per rank
        tag_dir = self.root / tag
        if self.rank == 0 or self.remote is not None:
            if tag_dir.exists():  # debris of an interrupted save of this same step
                shutil.rmtree(tag_dir)
            tag_dir.mkdir(parents=True)
        self.eng.barrier()
        self.eng.engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
        torch.save({"rng": rng_state(), **rank_state}, _rank_file(tag_dir, self.rank))
        if self.rank == 0:
            from hgscale.tracking.runinfo import mask_secrets

            # checkpoints get copied and shared: credentials in URLs or passthrough keys stay out of them
            meta = {"step": step, "run_id": run_id, "time": time.time(), "config": mask_secrets(self.cfg.to_dict()),
                    "deepspeed": mask_secrets(self.ds_json), "topology": self.eng.topology(), **(extra or {})}
            _atomic_write(tag_dir / META, json.dumps(meta, indent=1))
        if self.remote is not None:  # COMPLETE and latest follow once every rank's upload is done
            self.remote.upload(tag)
            return tag_dir
        self.eng.barrier()  # every rank's files are on disk
        if self.rank == 0:
            _atomic_write(tag_dir / COMPLETE, "")
            _atomic_write(self.root / LATEST, tag)
            self._prune(keep=tag)
        self.eng.barrier()
        return tag_dir

    def _prune(self, keep: str) -> None:
        tags = _complete_tags(self.root)
        n = max(self.cfg.checkpoint.keep_last, 1)
        doomed = [t for t in tags[:-n] if t != keep]
        newest = int(_TAG_RE.match(keep).group(1))
        for p in self.root.iterdir():  # incomplete older directories: crashed saves
            m = _TAG_RE.match(p.name)
            if p.is_dir() and m and not (p / COMPLETE).exists() and int(m.group(1)) < newest:
                doomed.append(p.name)
        for t in doomed:
            shutil.rmtree(self.root / t, ignore_errors=True)

    def load(self, root: Path, tag: str) -> dict:
        """Restore engine, optimizer, scheduler and this rank's client state; returns
        {"step", "run_id", "meta", **rank_state}. A checkpoint of another layout goes through
        :mod:`hgscale.reshard` (converted once, kept beside it)."""
        tag_dir = root / tag
        if self.remote is not None:  # only the files this rank reads (all of them for a layout conversion)
            self.remote.download(tag, json.loads((tag_dir / META).read_text()),
                                 everything=bool(layout_problem(tag_dir, self.eng.topology())))
        if layout_problem(tag_dir, self.eng.topology()):  # train.py's preflight checked it can be converted
            from hgscale.reshard import load_resharded
            return load_resharded(self, root, tag)
        meta = json.loads((tag_dir / META).read_text())
        path, _ = self.eng.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {str(tag_dir)!r}")
        state = torch.load(_rank_file(tag_dir, self.rank), weights_only=False)
        set_rng_state(state.pop("rng"))
        return {"step": meta["step"], "run_id": meta.get("run_id"), "meta": meta, **state}


# --------------------------------------------------------------------------------------------- export

def consolidated_state_dict(root: str | Path, tag: str | None = None) -> tuple[dict, Config]:
    """HourglassLM state dict (fp32) and config of a pipeline or ZeRO 0-3 checkpoint; no process group."""
    root, tag = resolve(Path(root) / tag if tag else root)
    tag_dir = root / tag
    meta = json.loads((tag_dir / META).read_text())
    cfg = config_from_dict(meta["config"], validate=False)
    sd: dict[str, torch.Tensor] = {}
    if meta["topology"]["pipeline_stages"] > 1:
        for f in sorted(tag_dir.glob("layer_*-model_states.pt")):
            idx = int(f.name.split("_")[1].split("-")[0])
            for k, v in torch.load(f, map_location="cpu", weights_only=False).items():
                sd[f"layers.{idx}.{k}"] = v
    elif meta["topology"]["zero_stage"] == 3 or (meta["topology"]["zero_stage"] > 0
                                                 and cfg.train.precision != "fp32"):
        # ZeRO-3 saves partitioned weights; with bf16/fp16 the fp32 master weights live in the optimizer files
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        full = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        sd = {k.removeprefix("model."): v for k, v in full.items()}
    else:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = {k.removeprefix("model."): v for k, v in states["module"].items()}
    return {k: v.detach().float().contiguous() for k, v in sd.items()}, cfg


def export(root: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Write ``out/model.safetensors`` and ``out/config.json``; returns ``out``."""
    from safetensors.torch import save_file

    from hgscale.models import HourglassLM

    sd, cfg = consolidated_state_dict(root, tag)
    model = HourglassLM(cfg.model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {str(root)!r} does not match model.hierarchy "
                              f"{cfg.model.hierarchy!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt", "hgscale": "HourglassLM"})
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    from hgscale.tracking.checkpoint_run import checkpoint_run, save_run_file

    save_run_file(checkpoint_run(Path(root) / tag if tag else root), out)  # later scores go to the training run
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    """(HourglassLM in eval mode, Config) from an exported directory."""
    from safetensors.torch import load_file

    from hgscale.models import HourglassLM

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{str(path)!r} holds no model.safetensors: export a checkpoint first with "
                              f"python -m hgscale.checkpoint export --checkpoint DIR --out {path}")
    cfg = config_from_dict(json.loads((path / "config.json").read_text()), validate=False)
    model = HourglassLM(cfg.model)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device).eval(), cfg


def load_any(path: str | Path, device: str | torch.device = "cpu"):
    """An exported directory or a training checkpoint (consolidated in memory) -> (HourglassLM, Config)."""
    from hgscale.models import HourglassLM

    if (Path(path) / "model.safetensors").is_file():
        return load_exported(path, device)
    sd, cfg = consolidated_state_dict(path)
    model = HourglassLM(cfg.model)
    model.load_state_dict(sd)
    return model.to(device).eval(), cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hgscale.checkpoint", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="consolidate a pipeline/ZeRO checkpoint into model.safetensors + config.json")
    ex.add_argument("--checkpoint", required=True, help="checkpoint directory (its latest) or one step directory")
    ex.add_argument("--tag", default=None, help="step directory name inside --checkpoint (default: latest)")
    ex.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.tag)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
