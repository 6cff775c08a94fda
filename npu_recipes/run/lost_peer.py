"""A worker of a multi-node job that loses its connection to another rank: one message, not a traceback.

When a node dies (power, kernel, ``kill -9`` of everything on it) or its network fails, the ranks
elsewhere fail inside a collective with the communication library's own error (gloo: ``Connection
reset by peer``; NCCL and HCCL: a closed or aborted communicator; a timeout after ``ddp_timeout``).
:func:`lost_peer` recognises such an error and turns it into :class:`npu_recipes.errors.LostPeer`,
naming the job's other nodes (as the shared-storage check saw them), the newest checkpoint and what to do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from npu_recipes.errors import LostPeer
from npu_recipes.run import checkpoints
from npu_recipes.run.shared_storage import Sighting

_SIGNS = re.compile(
    r"Connection reset by peer|Connection closed by peer|Broken pipe|Connection refused|Socket Timeout|timed out|"
    r"[Cc]ommunicator was aborted|NCCL error|HCCL|DistNetworkError|DistBackendError|Watchdog caught collective operation timeout"
)
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*")


def library_line(error: BaseException) -> Optional[str]:
    """The communication library's one-line reason when ``error`` (or one it was raised from) is a lost
    connection to another rank; None for any other error. The C++ source location it starts with is dropped."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip()
        names = {kind.__name__ for kind in type(error).__mro__}
        if _SIGNS.search(text) or names & {"DistNetworkError", "DistBackendError"}:
            first = (text.splitlines() or [type(error).__name__])[0]
            return _SOURCE_PREFIX.sub("", first).split(". This is typically")[0]
        error = error.__cause__ or error.__context__
    return None


def lost_peer(error: BaseException, rank: int, node_rank: int, sightings: Sequence[Sighting], run_dir: Path) -> Optional[LostPeer]:
    """:class:`LostPeer` for ``error`` in global ``rank`` on node ``node_rank``, or None when it is not a lost connection.

    Args:
        sightings: every rank's (node_rank, host, token) from the start of the job
            (:func:`npu_recipes.run.shared_storage.check`); the other nodes are named from them.
        run_dir: the run directory, whose newest complete checkpoint a rerun continues from.
    """
    line = library_line(error)
    if line is None:
        return None
    others = sorted({(s.node_rank, s.host) for s in sightings if s.node_rank != node_rank})
    named = ", ".join(f"node {node} (host {host})" for node, host in others) or "another node"
    complete = checkpoints.complete(Path(run_dir))
    since = f"resume=auto continues from {complete[-1].name}" if complete else "no checkpoint was saved yet, so it starts at step 0"
    return LostPeer(
        f"rank {rank} on node {node_rank} lost its connection to another rank during training ({line}): "
        f"{named} of this job stopped or lost its network",
        fix=f"see that node's console or {Path(run_dir) / 'logs'}/rank<N>.log for why; then rerun the same command on every "
        f"node ({since})",
    )
