"""Everything that knows about ranks: DeepSpeed config, engine set-up and the pipeline adapter.

Import the submodules directly; ``ds_config`` and ``plan`` start no process group and
``ds_config`` imports neither torch nor deepspeed (it runs before any process group starts).
"""
