"""Every node of a multi-node run must see the same run directory: checked before training.

Node 0's launcher writes a fresh random token into ``RUN_DIR/.shared-storage-check`` before it starts
its workers (:func:`write_token`); every worker reads that file back from its own ``output_dir`` and
the workers compare what they read over the process group (:func:`check`). A node whose
``output_dir`` is another disk (no file, or an earlier launch's token) would otherwise train with its
checkpoint shards and records on its own disk, leaving node 0's checkpoints incomplete.
"""

from __future__ import annotations

import platform
import secrets
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

from npu_recipes import atomic
from npu_recipes.errors import UserError

TOKEN_FILE = ".shared-storage-check"
"""The file node 0 writes the token into, in the run directory."""


class Sighting(NamedTuple):
    """What one rank read: its node's ``node_rank``, ``host`` name and the ``token`` (None: no file)."""

    node_rank: int
    host: str
    token: Optional[str]


def write_token(run_dir: Path) -> str:
    """Write a new random token (32 hex digits) into ``run_dir``; returns it."""
    token = secrets.token_hex(16)
    atomic.write_text(Path(run_dir) / TOKEN_FILE, token + "\n")
    return token


def read_token(run_dir: Path) -> Optional[str]:
    """The token in ``run_dir`` as this process sees it, or None when there is no such file."""
    try:
        return (Path(run_dir) / TOKEN_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def unshared(sightings: Sequence[Sighting]) -> List[Sighting]:
    """The sightings, one per node, whose token differs from what node 0's ranks read (node 0 wrote it)."""
    reference = next((s.token for s in sightings if s.node_rank == 0), None)
    bad = {}
    for sighting in sightings:
        if sighting.node_rank != 0 and (sighting.token != reference or reference is None):
            bad.setdefault(sighting.node_rank, sighting)
    return [bad[node] for node in sorted(bad)]


def refusal(run_dir: Path, bad: Sequence[Sighting]) -> UserError:
    """The error for the nodes in ``bad`` (:func:`unshared`): names the first node, its host and the path."""
    first = bad[0]
    what = "is missing there" if first.token is None else "holds another launch's token there"
    others = f" (and {len(bad) - 1} other node(s))" if len(bad) > 1 else ""
    return UserError(
        f"node {first.node_rank} (host {first.host}){others} does not see the run directory node 0 writes: "
        f"{Path(run_dir) / TOKEN_FILE} {what}, so checkpoints and records would be split between the nodes' disks",
        fix="put output_dir on a filesystem every node mounts at the same path (NFS, Lustre, a ReadWriteMany volume), "
        "the same output_dir on every node",
    )


def check(run_dir: Path, node_rank: int) -> List[Sighting]:
    """Compare the token every rank reads in ``run_dir``; a collective (every rank calls it once, after the
    process group exists). ``node_rank`` is this rank's node (its launcher's ``parallelism.node_rank``,
    :data:`npu_recipes.runtime.launch.NODE_RANK_VARIABLE`).

    Returns:
        Every rank's sighting, in global rank order (which node and host each rank is on).

    Raises:
        UserError: on every rank, when some node reads no token or another one (:func:`refusal`).
    """
    import torch.distributed as dist

    mine = Sighting(node_rank, platform.node(), read_token(run_dir))
    sightings: list = [None] * dist.get_world_size()
    dist.all_gather_object(sightings, tuple(mine))
    seen = [Sighting(*s) for s in sightings]
    bad = unshared(seen)
    if bad:
        raise refusal(run_dir, bad)
    return seen
