"""``plait train`` on flux through the core's one training path: the loss falls, validation
runs, a resumed run continues exactly, a run on the preprocessing cache takes the same
steps bit for bit, ``plait convert`` writes what diffusers loads (and a BFL single file),
FSDP, tensor and context parallelism over two ranks train like one process and sample its
images, and the layouts flux cannot take are refused with a message. One reference run per
module; every other run is compared against it."""
import shutil

import pytest

from plait.testing import assert_losses_match, run_ranks_in_sequence, train_in_this_process

STEPS = 4
SAVED = 2


def job(dump, *extra, local_batch_size=4, steps=STEPS):
    return [
        "--config", "flux_debug",
        "--model.flavor", "flux-debug-tiny-guidance",
        "--training.steps", str(steps),
        "--training.local_batch_size", str(local_batch_size),
        "--training.deterministic", "True",
        "--optimizer.lr", "3e-3",
        "--lr_scheduler.warmup_steps", "1",
        "--flux.image_size", "8",
        "--flux.embedded_samples", "32",
        "--checkpoint.interval", str(SAVED),
        "--validation.interval", str(SAVED),
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    return folder, train_in_this_process(job(folder))


def test_trains_validates_and_checkpoints(reference):
    folder, run = reference
    losses = run["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    assert sorted(run["validation_losses"]) == [SAVED, STEPS]
    assert (folder / "checkpoint" / f"step-{STEPS}").is_dir()


def test_resume_continues_exactly(tmp_path, reference):
    folder, run = reference
    (tmp_path / "checkpoint").mkdir()
    shutil.copytree(folder / "checkpoint" / f"step-{SAVED}", tmp_path / "checkpoint" / f"step-{SAVED}")
    resumed = train_in_this_process(job(tmp_path))["losses"]
    assert_losses_match(run["losses"], resumed, first_step=SAVED + 1, steps=STEPS, tolerance=0)


def test_steps_on_the_preprocessing_cache_equal_the_online_steps(tmp_path, reference, capsys):
    """The frozen encoders run once (plait preprocess) and training reads their outputs:
    every loss equals the reference run's, which encoded the same samples as it went."""
    from plait.cli import main

    cache = tmp_path / "cache"
    assert main(["preprocess", "--output", str(cache), *job(tmp_path / "unused")]) == 0
    assert f"--data.dataset {cache}" in capsys.readouterr().out
    _, run = reference
    cached = train_in_this_process(job(tmp_path / "run", "--data.dataset", str(cache), "--validation.interval",
                                       "0", "--checkpoint.enable", "False"))
    assert_losses_match(run["losses"], cached["losses"], first_step=1, steps=STEPS, tolerance=0)
    assert main(["preprocess", "--output", str(tmp_path / "again"), *job(tmp_path / "unused"),
                 "--data.dataset", str(cache)]) == 2
    assert "already a preprocessing cache" in capsys.readouterr().err


def test_convert_writes_a_folder_diffusers_loads(tmp_path, reference, capsys):
    diffusers = pytest.importorskip("diffusers")
    import torch

    from plait.checkpoint import load_model_state
    from plait.cli import main
    from plait_flux.spec import FLAVORS, flux_spec
    from test_flux_hf import diffusers_forward, inputs

    folder, _ = reference
    checkpoint = folder / "checkpoint" / f"step-{STEPS}"
    assert main(["convert", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert "weights and config only" in capsys.readouterr().out
    args = FLAVORS["flux-debug-tiny-guidance"]
    model = flux_spec().build_meta(args).to_empty(device="cpu")
    state = model.state_dict()
    load_model_state(str(checkpoint), state)
    model.load_state_dict(state)
    x = inputs(args)
    with torch.no_grad():
        ours = model.eval()(**x)
    theirs = diffusers_forward(diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "hf").eval(), x)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_convert_writes_a_bfl_single_file(tmp_path, reference, capsys):
    """``--format bfl``: the fused layout of the reference (q, k, v and the MLP input in one
    projection, checked against the diffusers folder of the same checkpoint, whose forward
    is diffusers' own), read back into the same model."""
    import torch
    from safetensors.torch import load_file

    from plait.checkpoint import load_model_state
    from plait.cli import main
    from plait.hf import load_hf_folder
    from plait_flux.hf import load_bfl_file
    from plait_flux.spec import FLAVORS, flux_spec

    folder, _ = reference
    checkpoint = str(folder / "checkpoint" / f"step-{STEPS}")
    assert main(["convert", checkpoint, str(tmp_path / "flux1-tiny.safetensors"), "--format", "bfl"]) == 0
    assert "as a bfl file" in capsys.readouterr().out
    assert main(["convert", checkpoint, str(tmp_path / "hf")]) == 0
    bfl = load_file(tmp_path / "flux1-tiny.safetensors")
    _, hf = load_hf_folder(tmp_path / "hf")
    for part in ("weight", "bias"):
        fused = torch.cat([hf[f"single_transformer_blocks.0.attn.to_{x}.{part}"] for x in "qkv"]
                          + [hf[f"single_transformer_blocks.0.proj_mlp.{part}"]])
        torch.testing.assert_close(bfl[f"single_blocks.0.linear1.{part}"], fused, rtol=0, atol=0)
        torch.testing.assert_close(bfl[f"double_blocks.0.txt_attn.qkv.{part}"], torch.cat(
            [hf[f"transformer_blocks.0.attn.add_{x}_proj.{part}"] for x in "qkv"]), rtol=0, atol=0)
        torch.testing.assert_close(bfl[f"single_blocks.0.linear2.{part}"],
                                   hf[f"single_transformer_blocks.0.proj_out.{part}"], rtol=0, atol=0)
    args = FLAVORS["flux-debug-tiny-guidance"]
    state = flux_spec().build_meta(args).to_empty(device="cpu").state_dict()
    load_model_state(checkpoint, state)
    back = load_bfl_file(tmp_path / "flux1-tiny.safetensors", args)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)
    assert main(["convert", checkpoint, str(tmp_path / "x.safetensors"), "--format", "ckpt"]) == 2
    assert "--format 'ckpt': model 'flux' writes no such file; its formats: hf (a Hugging Face folder), bfl" in \
        capsys.readouterr().err
    assert main(["convert", checkpoint, str(tmp_path / "flux1-tiny.safetensors"), "--format", "bfl"]) == 2
    assert "already exists" in capsys.readouterr().err


#: the multi-rank jobs, run one after the other in one launch of two ranks (start-up paid once)
PARALLEL = {
    "fsdp": ("--plugins", "fsdp", "--parallelism.dp_shard", "2"),
    "replicate": ("--plugins", "fsdp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"),
    "tp": ("--plugins", "tp", "--parallelism.tp", "2", "--tp.sequence_parallel", "False",
           "--activation_checkpoint.mode", "full"),
    "cp": ("--plugins", "context-parallel,fsdp", "--parallelism.cp", "2"),
}
SAMPLED = ("--training.sample_interval", str(STEPS), "--flux.sample_steps", "3")


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """FSDP, TP and CP over two ranks, the first two sampling images as they train
    (validation and checkpoints leave the training losses alone: skipped to save time)."""
    for module in ("plait_fsdp", "plait_tp", "plait_context_parallel"):
        pytest.importorskip(module)
    folder = tmp_path_factory.mktemp("parallel")
    jobs = [job(folder / name, *options, *(SAMPLED if name != "cp" else ()), "--validation.interval", "0",
                "--checkpoint.enable", "False", local_batch_size=2 if name in ("fsdp", "replicate") else 4)
            for name, options in PARALLEL.items()]
    results = run_ranks_in_sequence(2, jobs, folder / "result.json", timeout=300)
    return folder, dict(zip(PARALLEL, results))


@pytest.mark.parametrize("layout", list(PARALLEL))
def test_two_ranks_match_one_process(reference, parallel_runs, layout):
    """FSDP over two ranks, replication over two (HSDP's outer dimension), tensor parallelism (heads and MLP features of every block split
    over the ranks; with activation checkpointing) and context parallelism (each sample's
    image and text tokens split, ring attention) take the same steps as one process, within 1e-5."""
    _, run = reference
    _, runs = parallel_runs
    assert_losses_match(run["losses"], runs[layout]["losses"], first_step=1, steps=STEPS, tolerance=1e-5)


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_sharded_runs_sample_the_images_of_one_process(sampled, parallel_runs, layout):
    """Every rank draws the same images (a collective forward each), rank 0 writes them:
    the pixels of one process's images, up to one level of rounding."""
    single_folder, _ = sampled
    folder, _ = parallel_runs
    for index in range(3):
        ours = png_pixels(folder / layout / "samples" / f"step-{STEPS}" / f"{index}.png")
        theirs = png_pixels(single_folder / "samples" / f"step-{STEPS}" / f"{index}.png")
        assert ours.shape == theirs.shape
        assert (ours.int() - theirs.int()).abs().max() <= 1


def test_sampling_refuses_the_layouts_it_cannot_run_under():
    from plait.config import JobConfig
    from plait.errors import ConfigError
    from plait.training_samples import check_layout
    from plait_flux.sampling import FluxSampler

    config = JobConfig()
    config.parallelism.cp = 2
    with pytest.raises(ConfigError, match=r"samples under dp_replicate, dp_shard, tp only.*cp 2.*cp not supported"):
        check_layout(config, world_size=2, parallel_layouts=FluxSampler.parallel_layouts)
    config.parallelism.cp, config.parallelism.tp = 1, 2
    check_layout(config, world_size=2, parallel_layouts=FluxSampler.parallel_layouts)
    with pytest.raises(ConfigError, match="needs the whole model on one process"):  # a language model's
        check_layout(config, world_size=2)


@pytest.mark.parametrize("plugin, module, options, refusal", [
    ("pipeline", "plait_pipeline", ("--parallelism.pp", "2"), "pipeline stages pass token sequences only"),
    ("tp", "plait_tp", ("--parallelism.tp", "2"), "add --tp.sequence_parallel False"),
    ("context-parallel,fsdp", "plait_context_parallel", ("--parallelism.cp", "2", "--flux.image_size", "12"),
     "image tokens (set by --flux.image_size) is 9: choose sizes that are multiples of 4"),
])
def test_layouts_flux_cannot_take_are_refused_before_any_work(tmp_path, capsys, plugin, module, options, refusal):
    pytest.importorskip(module)
    from plait.cli import main

    code = main(["plan", "--world-size", "2", *job(tmp_path / "run", "--plugins", plugin, *options)])
    output = capsys.readouterr()
    assert code == 2 and refusal in output.out + output.err
    assert not (tmp_path / "run").exists()


def test_plan_reports_the_flux_step(tmp_path, capsys):
    from plait.cli import main

    assert main(["plan", "--world-size", "1", *job(tmp_path / "run")]) == 0
    assert "flux brings its own data pipeline" in capsys.readouterr().out


def png_pixels(path):
    """The ``uint8 [height, width, 3]`` pixels of a PNG the core wrote (one IDAT, filter 0 rows)."""
    import struct
    import zlib

    import torch

    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    length = struct.unpack(">I", data[33:37])[0]
    rows = zlib.decompress(data[41:41 + length])
    assert len(rows) == height * (1 + 3 * width)
    return torch.frombuffer(bytearray(rows), dtype=torch.uint8).view(height, 1 + 3 * width)[:, 1:].reshape(
        height, width, 3)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampled")
    return folder, train_in_this_process(job(folder, "--training.sample_interval", str(SAVED), "--flux.sample_steps",
                                             "3", "--validation.interval", str(SAVED)))


def test_sampled_images_go_to_png_and_tensorboard_and_leave_the_losses_alone(reference, sampled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = reference
    folder, sampled_run = sampled
    assert sampled_run["losses"] == run["losses"]  # sampling draws from its own generator
    for step in (SAVED, STEPS):
        pngs = sorted((folder / "samples" / f"step-{step}").glob("*.png"))
        assert [png.name for png in pngs] == ["0.png", "1.png", "2.png"]  # the recipe's three captions
    assert png_pixels(folder / "samples" / f"step-{STEPS}" / "0.png").shape == (8, 8, 3)
    events = EventAccumulator(str(folder / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("samples/0")] == [SAVED, STEPS]
