"""Checkpointing: one package over a neutral storage layer (:mod:`hgscale.core.storage`).

    layout.py    names and markers (tags, COMPLETE, latest, rank files), durable writes, layout keys
    manager.py   CheckpointManager: collective save, resume, keep-last-N
    remote.py    object storage: node-local staging, background upload, attempts, per-rank download
    staging.py   what a rank stages and downloads of a remote checkpoint (private node-local staging)
    reshard.py   elastic resume: a checkpoint of one parallel layout loaded into another
    export.py    one model on one device: consolidation, safetensors, safe loading
    run_link.py  the MLflow run that trained a checkpoint (read from hgscale.json or an export's run.json)

Import the submodules directly (``layout`` and ``remote`` import neither torch nor deepspeed).
"""
