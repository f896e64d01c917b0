"""A training checkpoint as one model on one device: consolidation, safetensors export and loading.

    sd, cfg = consolidated_state_dict("runs/ckpt")          # pipeline or ZeRO 0-3 checkpoint, no process group
    export("runs/ckpt", "runs/export")                      # model.safetensors + config.json (+ its MLflow run)
    model, cfg = load_any("runs/export" or "runs/ckpt")     # HourglassLM in eval mode

Checkpoints read here may come from someone else (a shared drive, a download): every ``.pt`` file is loaded
with ``weights_only=True`` and only the classes DeepSpeed's files hold (:func:`safe_load`), so a crafted file
cannot run code. Resuming one's own run keeps DeepSpeed's loader (README: what trusts what).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from hgscale.checkpoint.hf import PREFIX, is_hf_export, read_hf_config
from hgscale.checkpoint.layout import CheckpointError, read_meta, resolve
from hgscale.config import Config, ConfigError, config_from_dict

log = logging.getLogger(__name__)


def _allowed_globals() -> list:
    """Classes besides tensors and containers that DeepSpeed writes into model-state files (argparse namespaces
    of its config, the loss scaler's enum-free state). Nothing here has a reduce hook that runs code."""
    import argparse
    import collections

    return [argparse.Namespace, collections.OrderedDict, torch.Size]


def safe_load(path: Path) -> dict:
    """torch.load of a file someone else may have written: tensors and plain containers only. A file holding
    anything else (a pickle payload) is a CheckpointError naming it; nothing in it runs."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing: the checkpoint is incomplete") from None
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError or EOFError for bad files
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be loaded safely ({why}): it holds objects "
                              f"other than tensors, or is corrupt; only load checkpoints you trust with DeepSpeed "
                              f"itself") from None


def _config(meta: dict, where: str) -> Config:
    try:
        return config_from_dict(meta["config"], validate=False)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {where!r} holds a config this hgscale cannot read: {e}") from None


def consolidated_state_dict(root: str | Path, tag: str | None = None) -> tuple[dict, Config]:
    """HourglassLM state dict (fp32) and config of a pipeline or ZeRO 0-3 checkpoint; no process group."""
    root, tag = resolve(Path(root) / tag if tag else root)
    tag_dir = root / tag
    meta = read_meta(tag_dir)
    cfg = _config(meta, str(tag_dir))
    topo = meta["topology"]
    if topo.get("pipeline_stages", 1) > 1:
        sd = {}
        for f in sorted(tag_dir.glob("layer_*-model_states.pt")):
            idx = int(f.name.split("_")[1].split("-")[0])
            sd.update({f"layers.{idx}.{k}": v for k, v in safe_load(f).items()})
    elif topo.get("zero_stage") == 3 or (topo.get("zero_stage", 0) > 0 and cfg.train.precision != "fp32"):
        sd = _fp32_from_zero(root, tag)
    else:
        states = safe_load(tag_dir / "mp_rank_00_model_states.pt")
        if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
            raise CheckpointError(f"checkpoint file {str(tag_dir / 'mp_rank_00_model_states.pt')!r} holds no "
                                  f"module weights: the checkpoint is corrupt")
        sd = {k.removeprefix("model."): v for k, v in states["module"].items()}
    return {k: v.detach().float().contiguous() for k, v in sd.items()}, cfg


# What DeepSpeed's optimizer files hold besides tensors and containers: plain records without code of their own
_DEEPSPEED_GLOBALS = {"deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "argparse.Namespace"}


def vet(path: Path) -> None:
    """Refuse a file that names any class outside torch's safe set and the records DeepSpeed writes (a pickle
    payload needs a callable such as os.system): the check reads the pickle's globals, it runs nothing."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - not a torch zip file, or truncated
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be loaded safely (not a readable torch file: "
                              f"{type(e).__name__}); it is corrupt or was not written by DeepSpeed") from None
    bad = sorted(set(found) - _DEEPSPEED_GLOBALS)
    if bad:
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be loaded safely: it names {bad[0]}, which is "
                              f"not part of a DeepSpeed checkpoint; only load checkpoints you trust with DeepSpeed "
                              f"itself")


def _fp32_from_zero(root: Path, tag: str) -> dict:
    """ZeRO-3 partitions the weights, and with bf16/fp16 the fp32 masters live in the optimizer files: DeepSpeed's
    own consolidation reads them, after every file it reads has been vetted (:func:`vet`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for f in sorted((root / tag).glob("*_states.pt")):
        vet(f)
    full = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return {k.removeprefix("model."): v for k, v in full.items()}


def _model(cfg: Config, sd: dict, where: str):
    from hgscale.models import HourglassLM

    model = HourglassLM(cfg.model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {where!r} does not match model.hierarchy {cfg.model.hierarchy!r}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def training_dataset(cfg: Config):
    """The dataset ``cfg`` trained on (its modality and tokenizer travel with an export), or None when it cannot be
    read; the caller says what it does without it."""
    from hgscale.core.storage import StorageError
    from hgscale.data.dataset import open_dataset

    try:
        return open_dataset(cfg.data, verify_checksums=False)
    except (StorageError, ValueError, OSError):
        return None


def _copy_tokenizer(cfg: Config, out: Path) -> None:
    """A SentencePiece model's tokenizer.model beside its weights: sampling and serving encode text with it."""
    if cfg.model.vocab_size == 256:
        return
    ds = training_dataset(cfg)
    if ds is None:
        log.warning("the training data (%s) cannot be read: the export holds no tokenizer; sampling and serving take "
                    "token ids", cfg.data.url)
    elif ds.tokenizer_url:
        from hgscale.data.io import read_bytes

        (out / "tokenizer.model").write_bytes(read_bytes(ds.tokenizer_url, ds.opts))


def export_dir(out: str | Path) -> Path:
    """``out``, created: the directory an export writes into (either format)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the export directory {str(out)!r} ({e.strerror}): pass another "
                              f"--out") from None
    return out


def export(root: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Write ``out/model.safetensors`` and ``out/config.json`` (and a SentencePiece model's tokenizer.model);
    returns ``out``."""
    from safetensors.torch import save_file

    sd, cfg = consolidated_state_dict(root, tag)
    _model(cfg, sd, str(root))
    out = export_dir(out)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt", "hgscale": "HourglassLM"})
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    _copy_tokenizer(cfg, out)
    from hgscale.checkpoint.run_link import checkpoint_run, save_run_file

    save_run_file(checkpoint_run(Path(root) / tag if tag else root), out)  # later scores go to the training run
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    """(HourglassLM in eval mode, Config) from an exported directory: ours, or a Hugging Face one (its config.json
    holds only the model's keys; the weights are named ``model.`` + ours)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{str(path)!r} holds no model.safetensors: export a checkpoint first with "
                              f"hgscale export --checkpoint DIR --out {path}")
    cfg = _exported_config(path)
    sd = load_file(str(path / "model.safetensors"))
    if is_hf_export(path):
        sd = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    model = _model(cfg, sd, str(path))
    return model.to(device).eval(), cfg


def _exported_config(path: Path) -> Config:
    """The Config of an exported directory: ours holds the whole training config, a Hugging Face one only the
    model's keys (the other sections take their defaults)."""
    if is_hf_export(path):
        return _config({"config": {"model": read_hf_config(path)}}, str(path))
    try:
        return _config({"config": json.loads((path / "config.json").read_text())}, str(path))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path / 'config.json')!r} is missing or corrupt ({e}): export again") from None


def load_any(path: str | Path, device: str | torch.device = "cpu"):
    """An exported directory or a training checkpoint (consolidated in memory) -> (HourglassLM, Config)."""
    if (Path(path) / "model.safetensors").is_file():
        return load_exported(path, device)
    sd, cfg = consolidated_state_dict(path)
    return _model(cfg, sd, str(path)).to(device).eval(), cfg


# What shapes the weights: an exported model fine-tunes under a config that agrees on these (dropout, max_seq_len,
# the kernel and the init scheme may differ)
ARCHITECTURE_KEYS = ("vocab_size", "d_model", "n_heads", "d_ff", "hierarchy", "downsample", "upsample", "attention",
                     "vanilla_attention")


def init_from_problem(model_cfg) -> str | None:
    """Why model.init_from cannot start ``model_cfg``'s model (one sentence), or None: the directory, its files, and
    the keys of :data:`ARCHITECTURE_KEYS`. Reads config.json only: preflight calls it before any process group."""
    path = Path(model_cfg.init_from)
    if "://" in model_cfg.init_from:
        return f"model.init_from = {model_cfg.init_from!r}: a local directory is needed (copy the export first)"
    if not (path / "model.safetensors").is_file():
        return (f"model.init_from = {str(path)!r} holds no model.safetensors: export a checkpoint there with "
                f"hgscale export --checkpoint DIR --out {path}")
    try:
        saved = _exported_config(path).model
    except CheckpointError as e:
        return f"model.init_from: {e}"
    diff = [f"{k} {getattr(saved, k)!r} (ours {getattr(model_cfg, k)!r})" for k in ARCHITECTURE_KEYS
            if getattr(saved, k) != getattr(model_cfg, k)]
    return (f"model.init_from = {str(path)!r} is a different model: {'; '.join(diff)}; set these model keys as "
            f"the export has them") if diff else None


def initial_weights(model_cfg) -> dict:
    """model.init_from's state dict (HourglassLM names), checked by :func:`init_from_problem`."""
    problem = init_from_problem(model_cfg)
    if problem:
        raise CheckpointError(problem)
    model, _ = load_exported(model_cfg.init_from)
    return model.state_dict()


def layer_weights(state: dict, index: int) -> dict:
    """The entries of layer ``index`` in an HourglassLM state dict, named as the layer names them."""
    prefix = f"layers.{index}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
