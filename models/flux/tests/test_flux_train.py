"""``plait train`` on flux through the core's one training path: the loss falls, validation
runs, a resumed run continues exactly, a run on the preprocessing cache takes the same
steps bit for bit, ``plait convert`` writes what diffusers loads, FSDP over two ranks trains
like one process, and plugins that shard token sequences refuse the model with a message.
One reference run per module; every other run is compared against it."""
import shutil

import pytest

from plait.testing import assert_losses_match, run_ranks, train_in_this_process

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


def test_fsdp2_matches_one_process(tmp_path, reference):
    pytest.importorskip("plait_fsdp")
    _, run = reference
    # validation and checkpoints leave the training losses alone: skipped here to save time
    argv = job(tmp_path, "--plugins", "fsdp", "--parallelism.dp_shard", "2", "--validation.interval", "0",
               "--checkpoint.enable", "False", local_batch_size=2)
    losses = run_ranks(2, argv, tmp_path / "result.json")["losses"]
    assert_losses_match(run["losses"], losses, first_step=1, steps=STEPS, tolerance=1e-5)


@pytest.mark.parametrize("plugin, module, degree, refusal", [
    ("context-parallel,fsdp", "plait_context_parallel", "cp", "context parallelism shards token sequences only"),
    ("pipeline", "plait_pipeline", "pp", "pipeline stages pass token sequences only"),
])
def test_token_sequence_plugins_refuse_before_any_work(tmp_path, capsys, plugin, module, degree, refusal):
    pytest.importorskip(module)
    from plait.cli import main

    code = main(["plan", "--world-size", "2", *job(tmp_path / "run", "--plugins", plugin,
                                                     f"--parallelism.{degree}", "2")])
    output = capsys.readouterr()
    assert code == 2 and refusal in output.out + output.err
    assert not (tmp_path / "run").exists()


def test_plan_reports_the_flux_step(tmp_path, capsys):
    from plait.cli import main

    assert main(["plan", "--world-size", "1", *job(tmp_path / "run")]) == 0
    assert "flux brings its own data pipeline" in capsys.readouterr().out


def test_sampled_images_go_to_png_and_tensorboard_and_leave_the_losses_alone(tmp_path, reference):
    import struct
    import zlib

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, run = reference
    sampled = train_in_this_process(job(tmp_path, "--training.sample_interval", str(SAVED), "--flux.sample_steps", "3",
                                        "--validation.interval", str(SAVED)))
    assert sampled["losses"] == run["losses"]  # sampling draws from its own generator
    for step in (SAVED, STEPS):
        pngs = sorted((tmp_path / "samples" / f"step-{step}").glob("*.png"))
        assert [png.name for png in pngs] == ["0.png", "1.png", "2.png"]  # the recipe's three captions
    data = (tmp_path / "samples" / f"step-{STEPS}" / "0.png").read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    length = struct.unpack(">I", data[33:37])[0]
    rows = zlib.decompress(data[41:41 + length])
    assert (width, height) == (8, 8) and len(rows) == height * (1 + 3 * width)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("samples/0")] == [SAVED, STEPS]
