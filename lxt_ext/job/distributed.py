"""torch.distributed for a job: one process per device under ``torchrun``, or a group of one.

``torchrun --nproc_per_node=N`` (and multi-node with its ``--nnodes``/``--rdzv_*`` flags) sets RANK,
WORLD_SIZE and LOCAL_RANK; the job then joins a process group (NCCL on GPUs, gloo on the CPU), takes
the batches ``b`` with ``b % WORLD_SIZE == RANK`` and meets the others at a barrier before rank 0
merges the index. Rank 0 alone prepares the output folder and decides the outcome, and ``broadcast``
hands both to the others, so that every rank acts on the same facts. Without those variables (or
WORLD_SIZE 1) nothing is initialised.
"""
import datetime
import os

import torch

# Ranks wait at the final barrier for the slowest one: allow for long jobs.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


class Group:
    """The processes of one job: this one's ``rank``, their number ``world``, and this one's ``device``.

    Parameters
    ----------
    device : str or torch.device
        The device asked for; a bare ``'cuda'`` under torchrun becomes the process's local GPU.
    """

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
        """Wait until every rank has come here.
        """
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == 'cuda':
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value``, in every rank.

        Parameters
        ----------
        value : object
            A picklable value; only rank 0's is used.

        Returns
        -------
        object
            Rank 0's value (``value`` itself in a group of one).
        """
        if self.world == 1:
            return value
        import torch.distributed as dist

        values = [value if self.rank == 0 else None]
        dist.broadcast_object_list(values, src=0, device=self.device if self.device.type == 'cuda' else None)
        return values[0]

    def close(self):
        """Leave the process group, if this group started it.
        """
        if self._initialised:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._initialised = False
