"""What every test that spawns its own gloo processes needs: a free port, and a way out of a
worker that cannot abort after its results are written.

Why the exit is special: a worker aborted after its last check ("terminate called without an
active exception", SIGABRT), which ``mp.spawn`` reports as a failed worker although its results
were on disk. Seen twice in full-suite runs on a 2-core AMD EPYC (Zen 5), never when a test file
ran alone. The likely cause, reported upstream for gloo: its threads still hold finished
collectives (tensors with Python references) when the interpreter finalizes, and releasing them
then aborts. Leaving with ``os._exit`` skips that finalization.
"""

from __future__ import annotations

import gc
import os
import socket
import sys

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finish_worker() -> None:
    """End a spawned worker whose results are written: wait for every rank, drop what the finished
    collectives hold, destroy the group, and leave without interpreter finalization."""
    dist.barrier()  # no rank tears the group down while another's last collective is in flight
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
