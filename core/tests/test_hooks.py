"""Every hook the core calls, proven with a throwaway plugin: called at its documented
moment, with its documented arguments, and its result used. Runs a tiny model of the
plugin's own on the embedded data, in this process."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from plait import hookimpl
from plait.config import JobConfig
from plait.errors import ConfigError, PluginError
from plait.job import resolve_job
from plait.train import Trainer
from plait.train_state import RunNeeds

from toy_model import TOY_SPEC, MarkedLinear, ToyModelPlugin, manager_with, toy_config, train_toy

class Counter:
    """A stateful object a plugin adds to every checkpoint."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = int(state["value"])


class LifecyclePlugin:
    PLAIT_API_VERSION = 1
    PROVIDES = ("model:hooktoy",)
    REQUIRES = ()

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.counter = Counter()
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_steps = 0
        self.logged: list[tuple[int, set[str]]] = []
        self.validated_job = None

    @hookimpl
    def plait_register_models(self, register):
        register(TOY_SPEC)

    @hookimpl
    def plait_validate(self, config, parallel_dims, model_spec, job):
        self.calls.append("validate")
        self.validated_job = job

    @hookimpl
    def plait_convert_model(self, model, config, model_spec):
        self.calls.append("convert_model")
        assert all(p.device.type == "meta" for p in model.parameters())  # before materializing
        assert model_spec is TOY_SPEC and config.model.name == "hooktoy"
        head = model.head
        marked = MarkedLinear(head.in_features, head.out_features, device="meta")
        model.head = marked

    @hookimpl
    def plait_apply_data_parallel(self, model, config, parallel_dims, model_spec):
        self.calls.append("apply_data_parallel")
        assert isinstance(model.head, MarkedLinear)  # converted before any parallelism

    @hookimpl
    def plait_wrap_optimizer(self, optimizer, model_parts, config):
        self.calls.append("wrap_optimizer")
        assert isinstance(optimizer, torch.optim.AdamW) and len(model_parts) == 1
        replacement = torch.optim.AdamW(model_parts[0].parameters(), lr=config.optimizer.lr)

        def count(*_):
            self.optimizer_steps += 1

        replacement.register_step_post_hook(count)
        self.optimizer = replacement
        return replacement

    @hookimpl
    def plait_after_optimizer_step(self, ctx):
        self.counter.value += 1

    @hookimpl
    def plait_checkpoint_state(self, config):
        self.calls.append("checkpoint_state")
        return {"hooktoy_counter": self.counter}

    @hookimpl
    def plait_log_metrics(self, step, metrics, config):
        self.logged.append((step, set(metrics)))


def test_lifecycle_hooks_are_called_in_order_and_their_results_used(tmp_path):
    plugin = LifecyclePlugin()
    trainer, result = train_toy(toy_config(tmp_path), plugin)
    assert plugin.calls == ["validate", "convert_model", "apply_data_parallel", "wrap_optimizer", "checkpoint_state"]
    assert plugin.validated_job.model_args == 16 and plugin.validated_job.grad_accumulation_steps == 1
    assert isinstance(trainer.model_parts[0].head, MarkedLinear)
    assert trainer.optimizer is plugin.optimizer and plugin.optimizer_steps == 3
    assert [step for step, _ in plugin.logged] == [2, 3]  # log_freq 2 and the last step
    assert all({"loss", "grad_norm", "lr"} <= keys for _, keys in plugin.logged)
    assert sorted(result.losses) == [1, 2, 3]

    resumed = LifecyclePlugin()  # a fresh counter, restored from the step-3 checkpoint
    _, again = train_toy(toy_config(tmp_path, steps=4), resumed)
    assert resumed.counter.value == 4 and sorted(again.losses) == [4]


class ProcessGroupPlugin:
    PLAIT_API_VERSION = 1
    PROVIDES = ("model:hooktoy", "dp_shard")  # stands in for a data-parallel plugin
    REQUIRES = ()

    class Reached(Exception):
        pass

    def __init__(self) -> None:
        self.device = None
        self.meshes: list[str] = []

    @hookimpl
    def plait_register_models(self, register):
        register(TOY_SPEC)

    @hookimpl
    def plait_init_process_group(self, config, device):
        from torch.testing._internal.distributed.fake_pg import FakeStore

        self.device = device
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
        return True

    @hookimpl
    def plait_mesh_built(self, parallel_dims, config):
        self.meshes = parallel_dims.mesh_names()
        raise self.Reached  # the test ends here; a fake group cannot train


def test_process_group_hooks_replace_the_core_init_and_see_the_meshes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    plugin = ProcessGroupPlugin()
    manager = manager_with(plugin)
    job = resolve_job(toy_config(tmp_path), manager, manager.model_spec("hooktoy"), world_size=2)
    try:
        with pytest.raises(ProcessGroupPlugin.Reached):
            Trainer(job)
        assert dist.get_backend() == "fake"  # the plugin's group, not one the core made
        assert plugin.device.type == "cpu" and plugin.device.backend == "gloo"
        assert "dp_shard" in plugin.meshes and "world" in plugin.meshes
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class StepWrapper:
    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    @hookimpl(wrapper=True)
    def plait_train_step(self, ctx):
        loss = yield
        self.seen.append((ctx.step, float(loss)))
        return loss


class StepReplacement:
    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    @hookimpl
    def plait_train_step(self, ctx):
        ctx.results["grad_norm"] = torch.tensor(0.0)
        return torch.tensor(float(ctx.step))


class StepBeside:
    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    @hookimpl
    def plait_train_step(self, ctx):
        return None  # meant to wrap, forgot wrapper=True


def test_train_step_wrapper_sees_the_core_step(tmp_path):
    reference = train_toy(toy_config(tmp_path / "plain"), ToyModelPlugin())[1]
    wrapper = StepWrapper()
    wrapped = train_toy(toy_config(tmp_path / "wrapped"), ToyModelPlugin(), wrapper)[1]
    assert wrapped.losses == reference.losses
    assert [step for step, _ in wrapper.seen] == [1, 2, 3]
    assert [loss for _, loss in wrapper.seen] == pytest.approx(list(reference.losses.values()))


def test_train_step_replacement_runs_instead_of_the_core(tmp_path):
    trainer, result = train_toy(toy_config(tmp_path), ToyModelPlugin(), StepReplacement())
    assert result.losses == {1: 1.0, 2: 2.0, 3: 3.0}
    moments = [state["exp_avg"] for state in trainer.optimizer.state.values()]  # checkpointing made them
    assert all(not moment.any() for moment in moments)  # the core's step never ran the optimizer


def test_a_plain_step_implementation_returning_none_is_refused(tmp_path):
    with pytest.raises(PluginError, match="'throwaway1' implement plait_train_step without wrapper=True"):
        train_toy(toy_config(tmp_path), ToyModelPlugin(), StepBeside())


class SaveNever:
    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    @hookimpl
    def plait_checkpoint_save(self, checkpointer, step, force):
        return False


class SaveBeside:
    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    @hookimpl
    def plait_checkpoint_save(self, checkpointer, step, force):
        return None


def test_checkpoint_save_replacement_and_refusal(tmp_path):
    train_toy(toy_config(tmp_path / "never"), ToyModelPlugin(), SaveNever())
    assert not list((tmp_path / "never" / "checkpoint").glob("step-*"))  # the folder holds only the run's lock
    with pytest.raises(PluginError, match="implement plait_checkpoint_save without wrapper=True"):
        train_toy(toy_config(tmp_path / "beside"), ToyModelPlugin(), SaveBeside())


class NeedsPlugin:
    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    def __init__(self, needs: RunNeeds) -> None:
        self.needs = needs

    @hookimpl
    def plait_run_needs(self, config, parallel_dims, model_spec):
        return self.needs


def resolve_toy(config: JobConfig, *plugins: object):
    manager = manager_with(ToyModelPlugin(), *plugins)
    return resolve_job(config, manager, manager.model_spec("hooktoy"), world_size=1)


def test_declared_sequence_splits_multiply_and_are_checked(tmp_path):
    two = NeedsPlugin(RunNeeds(sequence_splits=2, reason="halves"))
    three = NeedsPlugin(RunNeeds(sequence_splits=3, reason="thirds"))
    with pytest.raises(ConfigError, match=r"--training.seq_len 16 must be a multiple of 6: (halves and thirds|thirds and halves) cut"):
        resolve_toy(toy_config(tmp_path), two, three)
    assert resolve_toy(toy_config(tmp_path, seq_len=24), two, three).needs.sequence_splits == 6


def test_a_plugin_that_applies_the_compute_dtype_turns_autocast_off(tmp_path):
    plain = resolve_toy(toy_config(tmp_path, dtype="bfloat16"))
    declared = resolve_toy(toy_config(tmp_path, dtype="bfloat16"),
                           NeedsPlugin(RunNeeds(applies_compute_dtype=True, compile_fullgraph=False)))
    assert not plain.needs.applies_compute_dtype and plain.needs.compile_fullgraph
    assert declared.needs.applies_compute_dtype and not declared.needs.compile_fullgraph
    _, result = train_toy(toy_config(tmp_path / "bf16", dtype="bfloat16", steps=1), ToyModelPlugin())
    _, fp32_params = train_toy(toy_config(tmp_path / "declared", dtype="bfloat16", steps=1), ToyModelPlugin(),
                               NeedsPlugin(RunNeeds(applies_compute_dtype=True)))
    # Without autocast (nobody casts the toy model) the step computes in float32.
    _, fp32 = train_toy(toy_config(tmp_path / "fp32", steps=1), ToyModelPlugin())
    assert fp32_params.losses == fp32.losses and result.losses != fp32.losses


def test_registration_hooks_go_through_pluggy(tmp_path):
    manager = manager_with(ToyModelPlugin())
    traced: list[str] = []
    manager._pm.add_hookcall_monitoring(lambda name, impls, kwargs: traced.append(name), lambda *a: None)
    assert manager.model_spec("hooktoy") is TOY_SPEC
    assert "plait_register_models" in traced


class EndWatcher:
    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    def __init__(self, fail_at: int = 0) -> None:
        self.fail_at = fail_at
        self.ends: list[tuple[object, object]] = []

    @hookimpl(wrapper=True)
    def plait_train_step(self, ctx):
        if ctx.step == self.fail_at:
            raise RuntimeError("boom")
        return (yield)

    @hookimpl
    def plait_train_end(self, config, result, error):
        self.ends.append((result, error))


def test_train_end_sees_the_result_or_the_error(tmp_path):
    watcher = EndWatcher()
    _, result = train_toy(toy_config(tmp_path / "ok", steps=2), ToyModelPlugin(), watcher)
    assert watcher.ends == [(result, None)]
    failing = EndWatcher(fail_at=2)
    with pytest.raises(RuntimeError, match="boom"):
        train_toy(toy_config(tmp_path / "failing", steps=3), ToyModelPlugin(), failing)
    [(result, error)] = failing.ends
    assert result is None and str(error) == "boom"


class BreakWeights:
    """After the optimizer step of step 2, a weight becomes infinite while the loss of that
    step (computed before) is still finite."""

    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    @hookimpl
    def plait_after_optimizer_step(self, ctx):
        if ctx.step == 2:
            with torch.no_grad():
                next(ctx.model_parts[0].parameters()).view(-1)[0] = float("inf")


def test_non_finite_weights_are_never_saved(tmp_path):
    from plait.errors import TrainingDivergedError

    config = toy_config(tmp_path, steps=4)
    config.checkpoint.interval = 1
    with pytest.raises(TrainingDivergedError, match=r"step 2: the weights hold NaN or inf .*last good checkpoint \(step 1 "):
        train_toy(config, ToyModelPlugin(), BreakWeights())
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("step-*")) == ["step-1"]


class HalveGradientsAndSkipAhead:
    """Scales the complete gradients and the loss before clipping (as a cross-group average
    would), and at step 2 moves the run to step 4 (as healing from a peer does)."""

    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    def __init__(self):
        self.seen_grad_norm = []

    @hookimpl
    def plait_gradients_ready(self, ctx):
        self.seen_grad_norm.append("grad_norm" in ctx.results)
        for param in ctx.model_parts[0].parameters():
            param.grad.mul_(0.5)
        ctx.results["loss"] = ctx.results["loss"] * 0.5

    @hookimpl(wrapper=True)
    def plait_train_step(self, ctx):
        loss = yield
        if ctx.step == 2:
            ctx.step = 4
        return loss


def test_gradients_ready_before_clipping_and_a_plugin_may_move_the_step(tmp_path):
    plain = train_toy(toy_config(tmp_path / "plain", steps=1), ToyModelPlugin())[1]
    plugin = HalveGradientsAndSkipAhead()
    _, result = train_toy(toy_config(tmp_path / "halved", steps=5), ToyModelPlugin(), plugin)
    assert plugin.seen_grad_norm == [False, False, False]  # steps 1, 2 (moved to 4), 5
    assert sorted(result.losses) == [1, 4, 5]
    assert result.losses[1] == pytest.approx(plain.losses[1] * 0.5)
    assert result.grad_norms[1] == pytest.approx(plain.grad_norms[1] * 0.5)
