"""torch.distributed for a job: one process per device under ``torchrun``, or a group of one.

``torchrun --nproc_per_node=N`` (and multi-node with its ``--nnodes``/``--rdzv_*`` flags) sets RANK,
WORLD_SIZE and LOCAL_RANK; the job then joins a process group (NCCL on GPUs, gloo on the CPU), takes
the batches ``b`` with ``b % WORLD_SIZE == RANK`` and meets the others at a barrier before rank 0
merges the index. Without those variables (or WORLD_SIZE 1) nothing is initialised.
"""
import datetime
import os

import torch

# Ranks wait at the final barrier for the slowest one: allow for long jobs.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


class Group:
    """``rank``, ``world`` (size), ``device`` of this process; ``barrier()``; ``close()``."""

    def __init__(self, device):
        self.world = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        device = torch.device(device)
        if device.type == 'cuda' and device.index is None and self.world > 1:
            device = torch.device('cuda', local_rank)
        self.device = device
        self._initialised = False
        if self.world > 1:
            import torch.distributed as dist

            if device.type == 'cuda':
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=BARRIER_TIMEOUT)
                self._initialised = True

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == 'cuda':
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self):
        if self._initialised:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._initialised = False
