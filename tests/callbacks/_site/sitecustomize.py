"""Loaded at start-up by the two-rank test processes (``_two_ranks.py`` puts this folder on
``PYTHONPATH``; Lightning's launcher passes it on to rank 1).

gloo's threads can abort the interpreter at exit ("terminate called without an active exception")
while the process group is still alive: destroy it first.
"""

import atexit


def _destroy_process_group() -> None:
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(_destroy_process_group)
