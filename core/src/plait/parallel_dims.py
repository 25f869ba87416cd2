"""The parallel degrees of a run and the device meshes built from them.

``ParallelDims`` checks the degrees of ``--parallelism`` against the world size, then
``build_mesh`` creates one 1-D world ``DeviceMesh`` and unflattens it into named views
that share its ranks:

- dense view ``pp × dp_replicate × dp_shard × cp × tp`` (tp innermost, pp outermost);
- flattened from it: ``dp`` = dp_replicate × dp_shard (which data each rank reads),
  ``dp_shard_cp`` = dp_shard × cp (the FSDP mesh), ``dp_cp`` = dp_replicate × dp_shard × cp
  (the ranks that reduce the loss and the gradients);
- for ep > 1, a sparse view ``pp × dp_replicate × efsdp × ep`` for the MoE layers: expert
  parallelism borrows its ranks from dp_shard × cp × tp (experts are not tensor-parallel),
  and ``efsdp`` = dp_shard × cp × tp / ep shards the experts that each ep rank holds.

Only dimensions of size > 1 get a process group; ``get_optional_mesh`` returns None for
the others (``efsdp`` is the exception: it exists whenever ep > 1, even of size 1, so the
experts always have an FSDP mesh). Several names give a 2-D mesh made from the 1-D ones
without new process groups, e.g. ``get_mesh(("dp_replicate", "dp_shard_cp"))`` for HSDP.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from plait.errors import ConfigError, PlaitError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from plait.config import ParallelismSection

DEGREE_NAMES = ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")
DENSE_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""Order of the dense view, outermost first: tp ranks are neighbours, pp ranks far apart."""
MESH_NAMES = (
    "world", "pp", "dp_replicate", "dp_shard", "cp", "tp",
    "dp", "dp_shard_cp", "dp_cp", "efsdp", "ep",
)  # fmt: skip
FLATTENED_MESHES = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}

MeshKey = str | Sequence[str]


class MeshNotAvailableError(PlaitError, LookupError):
    """A mesh was asked for that this run does not have (or that is not built yet)."""


@dataclass(kw_only=True, slots=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = -1
    """-1 fills: the world size divided by the other degrees."""
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    world_size: int = 1
    replica_groups: int = 1
    """Data-parallel replica groups: jobs of their own (torchft's fault-tolerant groups),
    each of ``world_size`` ranks, training the same model on other shards of every
    global batch. Set from the plugins' ``RunNeeds``; 1: this job is the whole run."""
    replica_group: int = 0
    """This job's index among the replica groups."""
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False)
    _combined: dict[tuple[str, ...], DeviceMesh] = field(default_factory=dict, init=False, repr=False)
    _built: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_config(cls, section: ParallelismSection, world_size: int) -> ParallelDims:
        return cls(
            dp_replicate=section.dp_replicate,
            dp_shard=section.dp_shard,
            cp=section.cp,
            tp=section.tp,
            pp=section.pp,
            ep=section.ep,
            world_size=world_size,
        )

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"the world size must be >= 1, got {self.world_size}")
        for name in DEGREE_NAMES:
            degree = getattr(self, name)
            if name == "dp_shard" and degree == -1:
                continue
            if degree < 1:
                allowed = "-1 (fill the world size) or >= 1" if name == "dp_shard" else ">= 1"
                raise ConfigError(f"--parallelism.{name} must be {allowed}, got {degree}")

        others = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others != 0:
                raise ConfigError(
                    f"--parallelism.dp_shard -1 cannot fill the world size {self.world_size}: "
                    f"dp_replicate {self.dp_replicate} × cp {self.cp} × tp {self.tp} × "
                    f"pp {self.pp} = {others} does not divide it; choose degrees whose "
                    f"product divides {self.world_size}"
                )
            self.dp_shard = self.world_size // others

        product = others * self.dp_shard
        if product != self.world_size:
            raise ConfigError(
                f"parallel degrees dp_replicate {self.dp_replicate} × dp_shard {self.dp_shard} × "
                f"cp {self.cp} × tp {self.tp} × pp {self.pp} = {product}, but the world size is "
                f"{self.world_size}: make the product equal the number of processes "
                f"(or set --parallelism.dp_shard -1 to fill)"
            )

        expert_region = self.dp_shard * self.cp * self.tp
        if expert_region % self.ep != 0:
            raise ConfigError(
                f"--parallelism.ep {self.ep} must divide dp_shard {self.dp_shard} × cp {self.cp} × "
                f"tp {self.tp} = {expert_region}: expert parallelism borrows its ranks from the "
                f"data-parallel shard, context-parallel and tensor-parallel ranks (the rest, "
                f"{expert_region} / ep, shard the experts FSDP-style); pick an ep that divides "
                f"{expert_region}"
            )

    # ------------------------------------------------------------------ derived sizes

    @property
    def dp_enabled(self) -> bool:
        return self.dp_degree > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters are sharded over dp_shard × cp (cp ranks shard too)."""
        return self.dp_shard * self.cp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def dp_degree(self) -> int:
        """How many distinct data streams the run reads (over all replica groups)."""
        return self.dp_replicate * self.dp_shard * self.replica_groups

    @property
    def efsdp(self) -> int:
        """How many ranks shard each expert (the expert region divided by ep)."""
        return self.dp_shard * self.cp * self.tp // self.ep

    @property
    def non_data_parallel_size(self) -> int:
        return self.cp * self.tp * self.pp

    def enabled_dims(self) -> list[str]:
        return [name for name in (*DENSE_DIMS, "ep") if getattr(self, name) > 1]

    def dp_rank(self) -> int:
        """This rank's data-parallel index (which data stream it reads): its index in the
        ``dp`` mesh (0 without one), after those of the replica groups before its own."""
        dp_mesh = self._meshes.get("dp")
        in_group = 0 if dp_mesh is None else dp_mesh.get_local_rank()
        return self.replica_group * self.dp_replicate * self.dp_shard + in_group

    # ------------------------------------------------------------------ meshes

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the world mesh and its named views; returns the world mesh.

        Needs ``torch.distributed`` initialized with ``world_size`` processes. A single
        process does not need a mesh: every ``get_optional_mesh`` is None without one.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise PlaitError(
                "ParallelDims.build_mesh needs torch.distributed to be initialized first "
                "(launch with torchrun; a single process needs no mesh)"
            )
        if dist.get_world_size() != self.world_size:
            raise PlaitError(
                f"the process group has {dist.get_world_size()} ranks but the parallel degrees "
                f"were resolved for a world size of {self.world_size}"
            )

        world = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("world",))
        meshes: dict[str, DeviceMesh] = {}
        if self.world_size > 1:
            meshes["world"] = world
            meshes.update(self._unflatten(world, {name: getattr(self, name) for name in DENSE_DIMS}))
            for flat_name, parts in FLATTENED_MESHES.items():
                flat = self._flatten(meshes, parts, flat_name)
                if flat is not None:
                    meshes[flat_name] = flat
        if self.ep_enabled:
            sparse = self._unflatten(
                world,
                {"pp": self.pp, "dp_replicate": self.dp_replicate, "efsdp": self.efsdp, "ep": self.ep},
                keep={"efsdp"},
            )
            # Its pp and dp_replicate groups duplicate the dense view's, which stay the ones handed out.
            meshes["efsdp"], meshes["ep"] = sparse["efsdp"], sparse["ep"]

        self._meshes = meshes
        self._combined = {}
        self._built = True
        return world

    @staticmethod
    def _unflatten(
        world: DeviceMesh, sizes: dict[str, int], keep: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, DeviceMesh]:
        """Unflatten ``world`` into the dimensions of size > 1 (and those in ``keep``)
        and return their 1-D meshes by name."""
        dims = {name: size for name, size in sizes.items() if size > 1 or name in keep}
        if not dims:
            return {}
        view = world._unflatten(0, tuple(dims.values()), tuple(dims))
        return {name: view[name] for name in dims}

    @staticmethod
    def _flatten(
        meshes: dict[str, DeviceMesh], parts: Sequence[str], name: str
    ) -> DeviceMesh | None:
        present = [part for part in parts if part in meshes]
        if not present:
            return None
        if len(present) == 1:
            return _renamed(meshes[present[0]], name)
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh._concatenate([meshes[part] for part in present])._flatten(name)

    def register_mesh(self, name: str, mesh: DeviceMesh) -> None:
        """Add or replace a named mesh after ``build_mesh`` (e.g. a fault-tolerant
        replicate group); meshes combined from the old one are dropped."""
        self._meshes[name] = mesh
        self._combined = {key: value for key, value in self._combined.items() if name not in key}

    def get_optional_mesh(self, name: MeshKey) -> DeviceMesh | None:
        """The mesh of ``name`` (or of several names, combined in that order), or None
        when one of them is disabled (degree 1), unknown, or the meshes are not built."""
        names = (name,) if isinstance(name, str) else tuple(name)
        if not names or any(part not in self._meshes for part in names):
            return None
        if len(names) == 1:
            return self._meshes[names[0]]
        combined = self._combined.get(names)
        if combined is None:
            from torch.distributed.device_mesh import DeviceMesh

            try:
                combined = DeviceMesh._concatenate([self._meshes[part] for part in names])
            except RuntimeError as error:
                raise MeshNotAvailableError(
                    f"meshes {list(names)} overlap (share a dimension) and cannot be combined"
                ) from error
            # Cached so that callers comparing meshes by identity (FSDP) see one object.
            self._combined[names] = combined
        return combined

    def get_mesh(self, name: MeshKey) -> DeviceMesh:
        """The mesh of ``name`` (or of several names, combined in that order); raises
        ``MeshNotAvailableError`` when it does not exist in this run."""
        mesh = self.get_optional_mesh(name)
        if mesh is not None:
            return mesh
        if not self._built:
            raise MeshNotAvailableError(
                f"mesh {name!r} requested before the meshes were built: call "
                f"ParallelDims.build_mesh(device_type) once torch.distributed is initialized"
            )
        names = (name,) if isinstance(name, str) else tuple(name)
        missing = [part for part in names if part not in self._meshes]
        reasons = [
            f"{part!r} is disabled (degree 1) in {self.describe()}"
            if part in MESH_NAMES
            else f"{part!r} is not a mesh name"
            for part in missing
        ]
        available = ", ".join(self._meshes) or "none (world size 1)"
        raise MeshNotAvailableError(
            f"no mesh {name!r}: {'; '.join(reasons)}. Available meshes: {available}; "
            f"use get_optional_mesh for a mesh that may be absent"
        )

    def mesh_names(self) -> list[str]:
        """Names of the 1-D meshes built for this run (empty before ``build_mesh``)."""
        return list(self._meshes)

    def describe(self) -> str:
        degrees = " × ".join(f"{name} {getattr(self, name)}" for name in DENSE_DIMS)
        return f"{degrees} (ep {self.ep}) = world size {self.world_size}"


def _renamed(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The same 1-D mesh under another name, sharing its process group (flattening a
    single dimension would create a duplicate group)."""
    from torch.distributed.device_mesh import DeviceMesh

    view = DeviceMesh(
        mesh.device_type,
        mesh_dim_names=(name,),
        _layout=mesh._layout,
        _rank_map=mesh._rank_map,
        _root_mesh=mesh._get_root_mesh(),
        _init_backend=False,
    )
    view._dim_group_names = mesh._dim_group_names
    return view
