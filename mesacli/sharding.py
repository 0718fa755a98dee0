"""The device mesh: one ("data",) axis over all devices (params replicated, batch sharded); with seeds in one
program, ("replica", "data")."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from mesacli.errors import MesaError


def make_mesh(devices: list | None = None, replicas: int = 1) -> Mesh:
    """One ("data",) axis over all devices: params replicated, batch sharded.  With ``replicas`` > 1
    (seeds in one program): ("replica", "data") with gcd(replicas, devices) devices on the replica axis."""
    devices = jax.devices() if devices is None else devices
    if replicas == 1:
        return Mesh(np.array(devices), ("data",))
    r = math.gcd(replicas, len(devices))
    return Mesh(np.array(devices).reshape(r, len(devices) // r), ("replica", "data"))


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    n = mesh.shape["data"]
    if batch_size % n:
        raise MesaError(f"{what} ({batch_size}) must be a multiple of the number of devices ({n})")
