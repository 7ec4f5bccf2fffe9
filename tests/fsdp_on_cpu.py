"""Runs a training script under accelerate's FSDP plugin in CPU processes: `python fsdp_on_cpu.py SCRIPT ARGS...`,
started by `accelerate launch --config_file examples/accelerate/fsdp2.yaml`.

accelerate turns FSDP on only for accelerator devices: in a CPU run its `AcceleratorState` becomes MULTI_CPU (DDP)
and leaves the FSDP plugin that its launcher configured (the `FSDP_*` variables of the config file) unused. This test
harness turns that plugin on, as accelerate does on GPUs, so that the same code runs here: accelerate's
`fsdp2_prepare_model` (fully_shard on every `_no_split_modules` class, the wrap policy the config names), the
Trainer's FSDP paths (gradient clipping on sharded parameters, `save_model` gathering the full state dict), over gloo.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


AcceleratorState.__init__ = _init_with_fsdp

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
