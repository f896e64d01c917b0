"""Launching hgscale ranks: on Slurm (``slurm/train_multinode.sh``) and on one machine.

- :mod:`launchers.env`       SLURM_* -> RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (one mapping for both)
- :mod:`launchers.local`     N ranks on this machine for development
- :mod:`launchers.hostlist`  Slurm node lists (``node[01-04,07]``) and ``deepspeed --hostfile`` files
- :mod:`launchers.preflight` the batch script's checks and log header before any rank starts

Nothing here imports torch: these run before (and around) the training processes.
"""
from launchers.env import LaunchError, Rendezvous, master_port_for_job, rendezvous_env, slurm_rank_env, slurm_rendezvous
from launchers.hostlist import HostlistError, expand_hostlist, expand_tasks_per_node, hostfile_text
from launchers.local import launch_local, local_rank_envs

__all__ = ["LaunchError", "Rendezvous", "master_port_for_job", "rendezvous_env", "slurm_rank_env", "slurm_rendezvous",
           "HostlistError", "expand_hostlist", "expand_tasks_per_node", "hostfile_text", "launch_local",
           "local_rank_envs"]
