"""Device meshes and logical-axis sharding rules.

Every model parameter carries a tuple of *logical* axis names (``"vocab"``, ``"embed"``,
``"heads"``, ...). A rules mapping turns each logical name into zero, one or several
mesh axes; :func:`logical_to_spec` builds the ``PartitionSpec`` and :func:`logical_sharding`
the ``NamedSharding`` for one array. Imports jax/numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

#: logical axis name -> mesh axis (or axes). Names not listed are replicated.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "embed": "fsdp",
    "head_dim": None,
    "layers": None,
    "seq": None,
}


class MeshError(ValueError):
    """A mesh cannot be built from the requested axes and devices."""


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with the named axes (in order) over ``devices`` (default: all devices).

    Axes use ``AxisType.Auto`` (classic jit sharding propagation). The product of the
    axis sizes must equal the number of devices; a size of -1 (at most one) takes the rest.
    """
    if not axes:
        raise MeshError("make_mesh needs at least one axis, e.g. {'data': 8}")
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axes)
    sizes = [int(s) for s in axes.values()]
    n_dev = len(devices)
    if sizes.count(-1) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {dict(axes)}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if rest <= 0 or n_dev % rest:
            raise MeshError(f"mesh axes {dict(axes)} cannot be fitted to {n_dev} devices")
        sizes[sizes.index(-1)] = n_dev // rest
    if any(s <= 0 for s in sizes):
        raise MeshError(f"mesh axis sizes must be positive, got {dict(axes)}")
    if math.prod(sizes) != n_dev:
        raise MeshError(
            f"mesh axes {dict(zip(names, sizes))} have {math.prod(sizes)} devices in total "
            f"but {n_dev} devices are available"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    if n_dev == len(jax.devices()) and devices == list(jax.devices()):
        return jax.make_mesh(tuple(sizes), names, axis_types=axis_types)
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names, axis_types=axis_types)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Mapping[str, MeshAxes] | None = None,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """``PartitionSpec`` for an array whose dimensions have the given logical names.

    With ``mesh``, mesh axes that the mesh lacks or that have size 1 are dropped; with
    ``shape`` too, a dimension keeps only the leading mesh axes whose product divides it
    (e.g. 3 KV heads on a 2-way tensor axis stay replicated). A mesh axis is used at most
    once per array.
    """
    rules = DEFAULT_RULES if rules is None else rules
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        target = rules.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        cands = (target,) if isinstance(target, str) else tuple(target)
        kept: list[str] = []
        prod = 1
        for ax in cands:
            if ax in used:
                continue
            if mesh is not None:
                if ax not in mesh.shape or mesh.shape[ax] == 1:
                    continue
                size = mesh.shape[ax]
                if shape is not None and shape[dim] % (prod * size):
                    break
                prod *= size
            kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_sharding(
    mesh: Mesh,
    logical_axes: Sequence[str | None],
    rules: Mapping[str, MeshAxes] | None = None,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """``NamedSharding`` on ``mesh`` for logical axes (see :func:`logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))
