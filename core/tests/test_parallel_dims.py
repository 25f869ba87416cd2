"""ParallelDims: validation of the degrees, and the meshes built from them.

Mesh layouts are checked against rank groups computed here from rank coordinates
(row-major over the view's dimensions), in one process with the fake process group
for large worlds and in 4 gloo processes for real collectives.
"""
from __future__ import annotations

import datetime
import math
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plait.cli import exit_process
from plait.config import ParallelismSection
from plait.errors import ConfigError, PlaitError
from plait.parallel_dims import MESH_NAMES, MeshNotAvailableError, ParallelDims

# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 64, 512])
def test_dp_shard_fills_the_world_by_default(world_size: int) -> None:
    pd = ParallelDims.from_config(ParallelismSection(), world_size)
    assert (pd.dp_replicate, pd.dp_shard, pd.cp, pd.tp, pd.pp, pd.ep) == (1, world_size, 1, 1, 1, 1)
    assert pd.world_size == world_size
    assert pd.dp_degree == world_size
    assert pd.dp_enabled is pd.fsdp_enabled is pd.dp_shard_enabled is (world_size > 1)
    assert pd.enabled_dims() == (["dp_shard"] if world_size > 1 else [])
    assert pd.non_data_parallel_size == 1


def test_405b_style_fsdp_times_tp_on_512_ranks() -> None:
    pd = ParallelDims.from_config(ParallelismSection(tp=8), 512)
    assert pd.dp_shard == 64
    assert pd.enabled_dims() == ["dp_shard", "tp"]
    assert pd.dp_degree == 64
    assert pd.non_data_parallel_size == 8
    assert pd.fsdp_enabled and pd.tp_enabled and not pd.pp_enabled and not pd.ep_enabled


def test_671b_style_fsdp_pipeline_and_experts_on_512_ranks() -> None:
    pd = ParallelDims.from_config(ParallelismSection(dp_shard=64, pp=8, ep=32), 512)
    assert pd.enabled_dims() == ["pp", "dp_shard", "ep"]
    assert pd.dp_degree == 64
    assert pd.efsdp == 2
    assert pd.non_data_parallel_size == 8


def test_hsdp_with_context_parallel_derives_sizes() -> None:
    pd = ParallelDims.from_config(ParallelismSection(dp_replicate=2, cp=2, tp=2), 16)
    assert pd.dp_shard == 2
    assert pd.dp_degree == 4
    assert pd.dp_replicate_enabled and pd.cp_enabled
    assert pd.non_data_parallel_size == 4


def test_context_parallel_alone_still_shards_parameters() -> None:
    pd = ParallelDims.from_config(ParallelismSection(dp_shard=1, cp=2), 2)
    assert pd.fsdp_enabled
    assert not pd.dp_enabled
    assert pd.dp_degree == 1


def test_product_mismatch_names_every_degree_and_the_fix() -> None:
    section = ParallelismSection(dp_shard=2, tp=2)
    with pytest.raises(ConfigError) as info:
        ParallelDims.from_config(section, 8)
    assert str(info.value) == (
        "parallel degrees dp_replicate 1 × dp_shard 2 × cp 1 × tp 2 × pp 1 = 4, but the world "
        "size is 8: make the product equal the number of processes "
        "(or set --parallelism.dp_shard -1 to fill)"
    )


def test_fill_that_cannot_divide_the_world_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        ParallelDims.from_config(ParallelismSection(tp=3), 8)
    message = str(info.value)
    assert "--parallelism.dp_shard -1 cannot fill the world size 8" in message
    assert "tp 3" in message and "= 3 does not divide it" in message


def test_fill_smaller_than_one_is_rejected() -> None:
    with pytest.raises(ConfigError, match="tp 4 × pp 1 = 8 does not divide"):
        ParallelDims.from_config(ParallelismSection(dp_replicate=2, tp=4), 4)


@pytest.mark.parametrize("name", ["dp_replicate", "cp", "tp", "pp", "ep"])
@pytest.mark.parametrize("degree", [0, -1])
def test_degrees_below_one_are_rejected(name: str, degree: int) -> None:
    with pytest.raises(ConfigError) as info:
        ParallelDims.from_config(ParallelismSection(**{name: degree}), 4)
    assert str(info.value) == f"--parallelism.{name} must be >= 1, got {degree}"


@pytest.mark.parametrize("degree", [0, -2])
def test_dp_shard_accepts_only_minus_one_below_one(degree: int) -> None:
    with pytest.raises(ConfigError) as info:
        ParallelDims.from_config(ParallelismSection(dp_shard=degree), 4)
    assert str(info.value) == f"--parallelism.dp_shard must be -1 (fill the world size) or >= 1, got {degree}"


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="world size must be >= 1, got 0"):
        ParallelDims.from_config(ParallelismSection(), 0)


@pytest.mark.parametrize(
    ("section", "world_size", "efsdp"),
    [
        (ParallelismSection(ep=8), 8, 1),  # experts over all data-parallel ranks
        (ParallelismSection(ep=2), 8, 4),
        (ParallelismSection(tp=4, ep=4), 4, 1),  # ep borrows the tp ranks
        (ParallelismSection(tp=4, ep=2), 8, 4),  # ep inside the tp ranks
        (ParallelismSection(dp_shard=2, cp=2, tp=2, ep=8), 8, 1),
        (ParallelismSection(dp_replicate=2, dp_shard=2, tp=2, ep=4), 8, 1),  # not across replicas
    ],
)
def test_ep_borrows_from_dp_shard_cp_and_tp(section: ParallelismSection, world_size: int, efsdp: int) -> None:
    pd = ParallelDims.from_config(section, world_size)
    assert pd.ep_enabled
    assert pd.efsdp == efsdp
    assert pd.efsdp * pd.ep == pd.dp_shard * pd.cp * pd.tp


@pytest.mark.parametrize(
    ("section", "world_size", "region"),
    [
        (ParallelismSection(dp_shard=4, tp=2, ep=3), 8, "dp_shard 4 × cp 1 × tp 2 = 8"),
        (ParallelismSection(ep=16), 8, "dp_shard 8 × cp 1 × tp 1 = 8"),
        (ParallelismSection(dp_replicate=4, ep=4), 8, "dp_shard 2 × cp 1 × tp 1 = 2"),
    ],
)
def test_ep_that_does_not_divide_its_region_is_rejected(
    section: ParallelismSection, world_size: int, region: str
) -> None:
    with pytest.raises(ConfigError) as info:
        ParallelDims.from_config(section, world_size)
    message = str(info.value)
    assert message.startswith(f"--parallelism.ep {section.ep} must divide {region}:")
    assert "borrows its ranks from the data-parallel shard, context-parallel and tensor-parallel" in message


def test_section_is_not_modified_by_filling() -> None:
    section = ParallelismSection()
    ParallelDims.from_config(section, 8)
    assert section.dp_shard == -1


def test_single_process_needs_no_mesh() -> None:
    pd = ParallelDims.from_config(ParallelismSection(), 1)
    assert not dist.is_initialized()
    for name in MESH_NAMES:
        assert pd.get_optional_mesh(name) is None
    assert pd.get_optional_mesh(("dp_replicate", "dp_shard_cp")) is None
    assert pd.dp_rank() == 0
    assert pd.mesh_names() == []
    with pytest.raises(MeshNotAvailableError, match="before the meshes were built: call ParallelDims.build_mesh"):
        pd.get_mesh("dp")
    with pytest.raises(PlaitError, match="needs torch.distributed to be initialized"):
        pd.build_mesh("cpu")


# ---------------------------------------------------------------------------------------
# Expected rank groups, computed from coordinates
# ---------------------------------------------------------------------------------------


def coordinates(rank: int, sizes: dict[str, int]) -> dict[str, int]:
    coords = {}
    for name in reversed(sizes):
        rank, coords[name] = divmod(rank, sizes[name])
    return coords


def expected_mesh(rank: int, sizes: dict[str, int], dims: tuple[tuple[str, ...], ...]) -> list:
    """The ranks of ``rank``'s mesh over ``dims`` (each entry: the view dimensions merged
    into one mesh dimension), as nested lists like ``DeviceMesh.mesh.tolist()``."""
    world_size = math.prod(sizes.values())
    mine = coordinates(rank, sizes)
    merged = {name for group in dims for name in group}
    peers = [
        r for r in range(world_size)
        if all(c == mine[n] for n, c in coordinates(r, sizes).items() if n not in merged)
    ]  # fmt: skip

    def index(r: int, group: tuple[str, ...]) -> int:
        coords, flat = coordinates(r, sizes), 0
        for name in group:
            flat = flat * sizes[name] + coords[name]
        return flat

    shape = [math.prod(sizes[n] for n in group) for group in dims]
    table: list = torch.full(shape, -1, dtype=torch.long)
    for r in peers:
        table[tuple(index(r, group) for group in dims)] = r
    return table.tolist()


def dense_sizes(pd: ParallelDims) -> dict[str, int]:
    return {"pp": pd.pp, "dp_replicate": pd.dp_replicate, "dp_shard": pd.dp_shard, "cp": pd.cp, "tp": pd.tp}


def sparse_sizes(pd: ParallelDims) -> dict[str, int]:
    return {"pp": pd.pp, "dp_replicate": pd.dp_replicate, "efsdp": pd.efsdp, "ep": pd.ep}


MESH_DIMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "world": ("dense", ("pp", "dp_replicate", "dp_shard", "cp", "tp")),
    "pp": ("dense", ("pp",)),
    "dp_replicate": ("dense", ("dp_replicate",)),
    "dp_shard": ("dense", ("dp_shard",)),
    "cp": ("dense", ("cp",)),
    "tp": ("dense", ("tp",)),
    "dp": ("dense", ("dp_replicate", "dp_shard")),
    "dp_shard_cp": ("dense", ("dp_shard", "cp")),
    "dp_cp": ("dense", ("dp_replicate", "dp_shard", "cp")),
    "efsdp": ("sparse", ("efsdp",)),
    "ep": ("sparse", ("ep",)),
}


def expected_layout(pd: ParallelDims, rank: int, name: str) -> list | None:
    """The 1-D mesh ``name`` should have on ``rank``, or None if it must not exist."""
    view, dims = MESH_DIMS[name]
    sizes = dense_sizes(pd) if view == "dense" else sparse_sizes(pd)
    if pd.world_size == 1 or (view == "sparse" and not pd.ep_enabled):
        return None
    if name != "efsdp" and math.prod(sizes[d] for d in dims) == 1:
        return None
    return expected_mesh(rank, sizes, (dims,))


def check_meshes(pd: ParallelDims, rank: int) -> None:
    for name in MESH_NAMES:
        expected = expected_layout(pd, rank, name)
        mesh = pd.get_optional_mesh(name)
        if expected is None:
            assert mesh is None, name
            continue
        assert mesh is not None, name
        assert mesh.mesh.tolist() == expected, name
        assert mesh.get_local_rank() == expected.index(rank), name
    dp = expected_layout(pd, rank, "dp")
    assert pd.dp_rank() == (0 if dp is None else dp.index(rank))
    assert sorted(pd.mesh_names()) == sorted(n for n in MESH_NAMES if expected_layout(pd, rank, n))


# ---------------------------------------------------------------------------------------
# Meshes with the fake process group (one process, any world size)
# ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_world() -> Iterator:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def init(world_size: int, rank: int) -> None:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


FAKE_CASES = [
    (ParallelismSection(), 2, 1),
    (ParallelismSection(tp=2), 4, 3),
    (ParallelismSection(dp_replicate=2), 4, 2),
    (ParallelismSection(dp_replicate=2, cp=2, tp=2, dp_shard=1), 8, 6),
    (ParallelismSection(pp=2, tp=2, ep=4), 8, 5),
    (ParallelismSection(tp=8), 64, 37),
    (ParallelismSection(dp_replicate=2, pp=2, cp=2, tp=2, ep=4), 32, 13),
    (ParallelismSection(tp=8), 512, 300),  # 405B style: FSDP 64 × TP 8
    (ParallelismSection(dp_shard=64, pp=8, ep=32), 512, 300),  # 671B style
    (ParallelismSection(dp_replicate=8, dp_shard=8, tp=8), 512, 461),
]


@pytest.mark.parametrize(("section", "world_size", "rank"), FAKE_CASES)
def test_mesh_layout(fake_world, section: ParallelismSection, world_size: int, rank: int) -> None:
    fake_world(world_size, rank)
    pd = ParallelDims.from_config(section, world_size)
    world = pd.build_mesh("cpu")
    assert world.mesh.tolist() == list(range(world_size))
    check_meshes(pd, rank)


@pytest.mark.parametrize(
    "section",
    [ParallelismSection(dp_replicate=2, pp=2, cp=2, tp=2, ep=4), ParallelismSection(tp=2, dp_shard=16)],
)
def test_named_dimensions_keep_their_names(fake_world, section: ParallelismSection) -> None:
    fake_world(32, 13)
    pd = ParallelDims.from_config(section, 32)
    pd.build_mesh("cpu")
    for name in pd.mesh_names():
        assert pd.get_mesh(name).mesh_dim_names == (name,)


def test_flattening_one_enabled_dimension_reuses_its_group(fake_world) -> None:
    fake_world(8, 3)
    pd = ParallelDims.from_config(ParallelismSection(tp=2), 8)
    pd.build_mesh("cpu")
    group = pd.get_mesh("dp_shard").get_group()
    for name in ("dp", "dp_shard_cp", "dp_cp"):
        assert pd.get_mesh(name).get_group() is group


def test_hsdp_and_expert_meshes_combine_dimensions(fake_world) -> None:
    fake_world(32, 13)
    pd = ParallelDims.from_config(ParallelismSection(dp_replicate=2, pp=2, cp=2, tp=2, ep=4), 32)
    pd.build_mesh("cpu")
    dense, sparse = dense_sizes(pd), sparse_sizes(pd)

    hsdp = pd.get_mesh(("dp_replicate", "dp_shard_cp"))
    assert hsdp.mesh_dim_names == ("dp_replicate", "dp_shard_cp")
    assert hsdp.mesh.tolist() == expected_mesh(13, dense, (("dp_replicate",), ("dp_shard", "cp")))
    assert tuple(hsdp.get_coordinate()) == (1, 2)
    assert pd.get_mesh(["dp_replicate", "dp_shard_cp"]) is hsdp  # one object per combination

    experts = pd.get_mesh(("dp_replicate", "efsdp"))
    assert experts.mesh.tolist() == expected_mesh(13, sparse, (("dp_replicate",), ("efsdp",)))
    fsdp_tp = pd.get_mesh(("dp_shard_cp", "tp"))
    assert fsdp_tp.mesh.tolist() == expected_mesh(13, dense, (("dp_shard", "cp"), ("tp",)))

    with pytest.raises(MeshNotAvailableError, match=r"\['dp_shard_cp', 'cp'\] overlap"):
        pd.get_mesh(("dp_shard_cp", "cp"))


def test_disabled_and_unknown_meshes(fake_world) -> None:
    fake_world(8, 5)
    pd = ParallelDims.from_config(ParallelismSection(tp=2), 8)
    pd.build_mesh("cpu")
    assert pd.get_optional_mesh("pp") is None
    assert pd.get_optional_mesh("fsdp") is None
    assert pd.get_optional_mesh(("dp_replicate", "dp_shard_cp")) is None
    with pytest.raises(MeshNotAvailableError) as info:
        pd.get_mesh("cp")
    message = str(info.value)
    assert "'cp' is disabled (degree 1)" in message
    assert "Available meshes: world, dp_shard, tp, dp, dp_shard_cp, dp_cp" in message
    with pytest.raises(MeshNotAvailableError, match="'fsdp' is not a mesh name"):
        pd.get_mesh("fsdp")
    with pytest.raises(LookupError):
        pd.get_mesh(("dp_replicate", "dp_shard_cp"))


def test_register_mesh_replaces_and_drops_combinations(fake_world) -> None:
    fake_world(8, 5)
    pd = ParallelDims.from_config(ParallelismSection(dp_replicate=2, tp=2), 8)
    world = pd.build_mesh("cpu")
    hsdp = pd.get_mesh(("dp_replicate", "dp_shard_cp"))
    replacement = world._unflatten(0, (2, 4), ("ft_replicate", "rest"))["ft_replicate"]
    pd.register_mesh("dp_replicate", replacement)
    assert pd.get_mesh("dp_replicate") is replacement
    rebuilt = pd.get_mesh(("dp_replicate", "dp_shard_cp"))
    assert rebuilt is not hsdp
    assert rebuilt.mesh_dim_names == ("ft_replicate", "dp_shard_cp")


def test_build_mesh_checks_the_process_group_size(fake_world) -> None:
    fake_world(8, 0)
    pd = ParallelDims.from_config(ParallelismSection(), 4)
    with pytest.raises(PlaitError, match="the process group has 8 ranks but .* world size of 4"):
        pd.build_mesh("cpu")


def test_world_size_one_with_a_process_group_builds_no_sub_mesh(fake_world) -> None:
    fake_world(1, 0)
    pd = ParallelDims.from_config(ParallelismSection(), 1)
    pd.build_mesh("cpu")
    assert all(pd.get_optional_mesh(name) is None for name in MESH_NAMES)
    with pytest.raises(MeshNotAvailableError, match="Available meshes: none"):
        pd.get_mesh("dp")


# ---------------------------------------------------------------------------------------
# Real collectives: 4 gloo processes
# ---------------------------------------------------------------------------------------

GLOO_CASES = [
    ParallelismSection(dp_shard=2, tp=2, ep=2),
    ParallelismSection(dp_replicate=2, dp_shard=2, ep=2),
    ParallelismSection(dp_shard=1, cp=2, tp=2),
]


def _gloo_rank(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for section in GLOO_CASES:
            pd = ParallelDims.from_config(section, world_size)
            pd.build_mesh("cpu")
            check_meshes(pd, rank)
            names = [(name,) for name in pd.mesh_names()]
            if pd.dp_replicate_enabled:
                names.append(("dp_replicate", "dp_shard_cp"))
            for key in names:
                mesh = pd.get_mesh(key)
                for dim in range(mesh.ndim):
                    # Each rank contributes one bit: the sum is the set of members.
                    bits = torch.tensor([float(2**rank)], dtype=torch.float64)
                    dist.all_reduce(bits, group=mesh.get_group(dim))
                    got = {r for r in range(world_size) if int(bits.item()) >> r & 1}
                    coordinate = mesh.get_coordinate()
                    assert coordinate is not None
                    row = mesh.mesh.movedim(dim, -1)[tuple(c for d, c in enumerate(coordinate) if d != dim)]
                    assert got == set(row.tolist()), (section, key, dim, got)
    finally:
        dist.destroy_process_group()
    exit_process(0, distributed=True)  # without the interpreter's teardown


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_meshes_group_the_right_ranks_with_gloo() -> None:
    mp.spawn(_gloo_rank, args=(4, _free_port()), nprocs=4, join=True)
