"""Launching hgscale ranks: on Slurm (``slurm/train_multinode.sh``) and on one machine.

- :mod:`launchers.env`       SLURM_* -> RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (one mapping
                             for both paths), and the per-task wrapper under srun
- :mod:`launchers.signals`   stop signals for ranks still starting up
- :mod:`launchers.local`     N ranks on this machine for development
- :mod:`launchers.hostlist`  Slurm node lists (``node[01-04,07]``) and ``deepspeed --hostfile`` files
- :mod:`launchers.preflight` the batch script's checks and log header before any rank starts

Each module runs as ``python -m launchers.<name>``, so this package imports none of them itself.
Nothing here imports torch: these run before (and around) the training processes.
"""
