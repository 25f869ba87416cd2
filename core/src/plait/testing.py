"""Helpers for multi-process tests of plait and its plugins.

``run_ranks(world_size, argv, out)`` runs ``plait train ARGV`` as ``world_size`` real
gloo ranks (one subprocess each, torchrun's environment, one thread per rank) and
returns rank 0's losses and gradient norms by step. ``python -m plait.testing OUT ARGV``
is the per-rank entry point it launches. ``losses_resumed_in_parallel`` compares one
process with a layout that resumes its first checkpoint. ``train_in_this_process(argv)``
is the same result of a run in this process, through ``keep_determinism_setting(run)``,
which restores torch's deterministic-algorithms switch afterwards;
``max_differences(run, reference)`` compares two such results step by step.

``model_conformance(spec, tiny=...)`` is the conformance suite of a model package: one
call in its tests returns a pytest class that checks the spec against the model
(meta build, parameter counts, FLOPs, HF parity, state dicts, TP/PP/CP declarations,
one training step).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.model_spec import dotted_attribute, module_path_matches


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world_size: int, argv: list[str], out: Path, *, timeout: float = 240) -> dict[str, dict[int, float]]:
    """Rank 0's ``{"losses": {step: loss}, "grad_norms": {step: norm}, "validation_losses":
    {step: loss}}`` of a distributed run."""
    return run_ranks_in_sequence(world_size, [argv], out, timeout=timeout)[0]


def run_ranks_in_sequence(
    world_size: int, jobs: list[list[str]], out: Path, *, timeout: float = 240
) -> list[dict[str, dict[int, float]]]:
    """``run_ranks`` of several jobs, one after the other in the same ``world_size``
    processes (one launch: the start-up and imports are paid once). Each job rendezvous
    on a port of its own: a process group created again on the same port meets the
    previous one's store."""
    argv = [arg for i, job in enumerate(jobs) for arg in ([JOB_SEPARATOR] if i else []) + job]
    ports = [str(free_port()) for _ in jobs]
    port = ports[0]
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            JOB_PORTS: ",".join(ports),
        }
        procs.append(subprocess.Popen([sys.executable, "-m", "plait.testing", str(out), *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise AssertionError(f"rank {rank} exited with {proc.returncode}:\n{output[-4000:]}")
    written = json.loads(Path(out).read_text())
    return [{key: {int(step): value for step, value in raw.get(key, {}).items()}
             for key in ("losses", "grad_norms", "validation_losses")}
            for raw in (written if isinstance(written, list) else [written])]


#: Separates the jobs ``run_ranks_in_sequence`` passes to each rank.
JOB_SEPARATOR = "--then"
#: Environment variable: the MASTER_PORT of each of those jobs, comma-separated.
JOB_PORTS = "PLAIT_TEST_JOB_PORTS"


def keep_determinism_setting(run):
    """``run()``, leaving torch's deterministic-algorithms switch as it was (a
    ``--training.deterministic`` job in this process turns it on)."""
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return run()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def train_in_this_process(argv: list[str]) -> dict[str, dict[int, float]]:
    """``{"losses": {step: loss}, "grad_norms": {step: norm}, "validation_losses": {step:
    loss}}`` of a run in this process."""
    from plait.cli import train

    result = keep_determinism_setting(lambda: train(argv))
    return {"losses": result.losses, "grad_norms": result.grad_norms, "validation_losses": result.validation_losses}


def max_differences(run: dict[str, dict[int, float]], reference: dict[str, dict[int, float]]) -> tuple[float, float]:
    """Largest |Δloss| and |Δgrad norm| over the steps (which must be the same)."""
    assert sorted(run["losses"]) == sorted(reference["losses"]), (run, reference)
    loss = max(abs(run["losses"][s] - reference["losses"][s]) for s in reference["losses"])
    norm = max(abs(run["grad_norms"][s] - reference["grad_norms"][s]) for s in reference["grad_norms"])
    return loss, norm


def losses_resumed_in_parallel(
    folder: Path, argv_for: Callable[[Path], list[str]], parallel: list[str], *, ranks: int
) -> tuple[dict[int, float], dict[int, float]]:
    """One process's losses and those of the same job resumed over ``ranks`` gloo ranks.

    ``argv_for(dump_folder)`` is the job; it must checkpoint every step. It trains once
    in this process, then its step-1 checkpoint is resumed with ``parallel`` options
    added, so both runs start step 2 from the same weights whatever initialization does
    under the layout. Returns (single-process losses, parallel losses from step 2 on).
    """
    from plait.cli import train

    single = train(argv_for(folder / "single")).losses
    shutil.copytree(folder / "single" / "checkpoint" / "step-1", folder / "parallel" / "checkpoint" / "step-1")
    parallel_losses = run_ranks(ranks, [*argv_for(folder / "parallel"), *parallel], folder / "losses.json")["losses"]
    return single, parallel_losses


def short_job(recipe: str, dump: Path, *options: str, steps: int, lr: float, local_batch_size: int = 2,
              seq_len: int = 64, checkpoint_interval: int | None = None) -> list[str]:
    """``plait train`` options of a short test run of ``recipe`` writing to ``dump``:
    ``steps`` steps of ``local_batch_size`` x ``seq_len`` tokens at learning rate ``lr``,
    no progress bar, a checkpoint every ``checkpoint_interval`` steps (every one kept when
    it is 1, so that ``losses_resumed_in_parallel`` can resume the first), then ``options``."""
    argv = ["--config", recipe, "--training.steps", str(steps), "--training.seq_len", str(seq_len),
            "--training.local_batch_size", str(local_batch_size), "--optimizer.lr", str(lr),
            "--metrics.progress", "off", "--job.dump_folder", str(dump)]  # fmt: skip
    if checkpoint_interval is not None:
        argv += ["--checkpoint.interval", str(checkpoint_interval)]
        if checkpoint_interval == 1:
            argv += ["--checkpoint.keep_latest_k", "0"]
    return [*argv, *options]


def assert_losses_match(single: dict[int, float], parallel: dict[int, float], *, first_step: int, steps: int,
                        tolerance: float = 1e-5) -> None:
    """Each step's loss from ``first_step`` to ``steps`` equal within ``tolerance``."""
    import pytest

    assert sorted(parallel) == list(range(first_step, steps + 1)), parallel
    for step in range(first_step, steps + 1):
        assert parallel[step] == pytest.approx(single[step], abs=tolerance), (step, parallel, single)


def check_plugins(*plugins: object, config: Any, parallel_dims: Any, model_spec: Any, device: Any = None) -> Any:
    """The checks ``plait train`` runs before any work, with only ``plugins`` (modules or
    objects) enabled: their declared needs and the device capabilities they require, the
    sequence length those imply, their ``plait_validate``. Returns the resolved ``Job``.
    For tests of a plugin's own checks; ``device`` (e.g. ``plait.capabilities.
    simulated_device("H100")``) is the device to check against, this machine's by default."""
    from plait.job import resolve_with_plugins
    from plait.plugins import PluginManager

    manager = PluginManager()
    for index, plugin in enumerate(plugins):
        manager.register_object(plugin, getattr(plugin, "__name__", f"plugin{index}"))
    return resolve_with_plugins(config, manager, model_spec, parallel_dims, device=device)


# --------------------------------------------------------------------------- model conformance


pattern_matches = module_path_matches


def materialize(spec: Any, args: Any, *, seed: int = 0, poison: bool = False) -> Any:
    """The core's recipe: build on meta, materialize on the CPU, ``init_weights`` from
    ``seed``. ``poison`` fills every tensor with NaN first, so anything ``init_weights``
    skips stays NaN."""
    import torch

    from plait.meta_init import materialize as materialize_on

    model = materialize_on(spec.build_meta(args), "cpu")
    if poison:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.fill_(float("nan"))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model


def randomize_parameters(model: Any, seed: int) -> None:
    """Weights large enough that a wrong layout, norm or routing shows in the logits:
    norms around 1, other parameters N(0, 0.15)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)


def counted_forward_flops(model: Any, tokens: Any) -> int:
    """FLOPs of one forward, counted by torch's ``FlopCounterMode`` (matmuls, SDPA and
    grouped matmuls of MoE experts, on the CPU too)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):  # noqa: ANN001, ANN202
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs):  # noqa: ANN001, ANN202
        # rows [tokens, in] (grouped by offsets) times weights [groups, in, out]
        return 2 * a_shape[0] * a_shape[-1] * b_shape[-1]

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
               torch.ops.aten._grouped_mm: grouped_mm}  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(tokens)
    return counter.get_total_flops()


def sqnr(reference: Any, actual: Any) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against ``reference``, in dB (inf if equal)."""
    import torch

    reference, actual = reference.detach().double(), actual.detach().double()
    noise = (reference - actual).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(reference.norm() / noise))


def linear_sqnr(reference: Any, converted: Any, inputs: Any, output_grad: Any) -> dict[str, float]:
    """SQNR (dB) of a converted one-linear ``nn.Sequential`` against its high-precision
    original on the same input and output gradient: ``output``, ``input grad``, ``weight grad``."""
    signals = []
    for module in (reference, converted):
        x = inputs.clone().requires_grad_()
        out = module(x)
        out.backward(output_grad)
        signals.append({"output": out, "input grad": x.grad, "weight grad": module[0].weight.grad})
    return {name: sqnr(signals[0][name], signals[1][name]) for name in signals[0]}


def fuse_hf_experts(hf_state: dict[str, Any]) -> dict[str, Any]:
    """``hf_state`` with every per-expert group ``<prefix>.experts.{e}.gate_proj/up_proj/down_proj.weight``
    rewritten in the fused layout some tools save: ``<prefix>.experts.gate_up_proj``
    ``[experts, 2 * hidden, dim]`` (gate, then up) and ``<prefix>.experts.down_proj``."""
    import re

    import torch

    groups: dict[str, dict[str, dict[int, Any]]] = {}
    fused = {}
    for key, tensor in hf_state.items():
        match = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key)
        if match is None:
            fused[key] = tensor
            continue
        prefix, expert, projection = match.groups()
        groups.setdefault(prefix, {}).setdefault(projection, {})[int(expert)] = tensor
    for prefix, projections in groups.items():
        stacked = {p: torch.stack([experts[e] for e in sorted(experts)]) for p, experts in projections.items()}
        fused[f"{prefix}.gate_up_proj"] = torch.cat([stacked["gate_proj"], stacked["up_proj"]], dim=1)
        fused[f"{prefix}.down_proj"] = stacked["down_proj"]
    return fused


def model_conformance(
    spec: Any,
    *,
    tiny: dict[str, Any],
    published: dict[str, float] | None = None,
    published_tolerance: float = 0.05,
    count_parameters: Callable[..., int] | None = None,
    hf: bool = True,
    randomize: Callable[[Any, int], None] = randomize_parameters,
    seq_len: int = 32,
    flops_rtol: float = 0.03,
) -> type:
    """A pytest class of the checks every model package passes; in its tests::

        TestConformance = model_conformance(mymodel_spec(), tiny={"dense": TINY, "moe": TINY_MOE})

    ``tiny``: small model args (name -> args) that together cover every variant of the
    model (dense and MoE, tied, low-rank, ...); each check runs on each. ``published``:
    flavor -> total parameters in billions, within ``published_tolerance``.
    ``count_parameters(args)``, if given, must equal the built model's parameter count
    for every flavor. ``hf``: the spec's HF adapter round-trips and matches transformers'
    logits (skipped when transformers is not installed); ``randomize(model, seed)`` sets
    the weights compared there (default ``randomize_parameters``; a model whose
    checkpointed buffers reach HF randomizes those too). The checks:

    - every flavor builds on the meta device; ``init_weights`` sets every tensor,
      deterministically from the global RNG;
    - the forward is causal, and ``flops_per_token`` is 3x a counted forward (matmuls and
      SDPA, within ``flops_rtol``);
    - the state dict loads into a fresh model and gives the same logits;
    - a DCP checkpoint exports to a sharded HF folder that transformers loads with the same
      logits, that converts back exactly (MoE experts also from the fused layout) and that
      ``plait.from_pretrained`` reloads;
    - the TP plan's patterns match modules and use known styles, ``divisible_by_tp``
      names integers; pipeline split points are modules and the stages compose to the
      whole model; CP attention modules and sequence buffers exist, and the buffers
      follow ``seq_len_arg``; expert modules exist;
    - one AdamW step on the loss is finite and moves every parameter that got a gradient;
    - generation (``plait.generation``; skipped for a model whose forward takes no cache):
      logits computed with the key/value cache, a prompt then one token at a time, equal the
      full forward's within 1e-5; a left-padded row continues as the prompt alone does, and
      as the full recompute does; greedy ``plait.generate`` equals transformers'
      ``generate`` on the same HF checkpoint token for token (prompts of three lengths).
    """
    import pytest
    import torch

    published = published or {}
    names = sorted(tiny)
    flavors = sorted(spec.flavors)

    def loss_of(model: Any, args: Any, tokens: Any) -> Any:
        logits = model(tokens)
        labels = torch.roll(tokens, -1, dims=1)
        if spec.loss_fn is not None:
            return spec.loss_fn(logits, labels)
        from plait.step import token_cross_entropy  # the loss the trainer uses

        return token_cross_entropy(logits, labels)

    def tokens_for(args: Any, *, batch: int = 2, length: int = seq_len, seed: int = 1) -> Any:
        return torch.randint(0, args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))

    class ModelConformance:
        @pytest.mark.parametrize("flavor", flavors)
        def test_flavor_builds_on_meta(self, flavor: str) -> None:
            args = spec.args_for(flavor)
            model = spec.build_meta(args)
            assert all(p.device.type == "meta" for p in model.parameters())
            n_params = sum(p.numel() for p in model.parameters())
            if count_parameters is not None:
                assert n_params == count_parameters(args), flavor
            if flavor in published:
                assert n_params / 1e9 == pytest.approx(published[flavor], abs=published_tolerance), n_params

        @pytest.mark.parametrize("name", names)
        def test_init_weights_sets_every_tensor_deterministically(self, name: str) -> None:
            args = tiny[name]
            model = materialize(spec, args, poison=True)
            for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
                assert torch.isfinite(tensor).all(), f"{key} was not initialized"
            again, other = materialize(spec, args), materialize(spec, args, seed=1)
            for (key, a), b in zip(model.state_dict().items(), again.state_dict().values()):
                assert torch.equal(a, b), key
            assert any(not torch.equal(a, c) for a, c in zip(model.state_dict().values(),
                                                             other.state_dict().values()))  # fmt: skip

        @pytest.mark.parametrize("name", names)
        def test_forward_is_causal(self, name: str) -> None:
            args = tiny[name]
            model = materialize(spec, args).eval()
            tokens = tokens_for(args)
            changed = tokens.clone()
            changed[:, seq_len // 2:] = (changed[:, seq_len // 2:] + 1) % args.vocab_size
            with torch.no_grad():
                logits, after = model(tokens), model(changed)
            assert logits.shape == (2, seq_len, args.vocab_size)
            torch.testing.assert_close(after[:, : seq_len // 2], logits[:, : seq_len // 2])
            assert not torch.allclose(after[:, seq_len // 2:], logits[:, seq_len // 2:])

        @pytest.mark.parametrize("name", names)
        def test_flops_per_token_matches_a_counted_forward(self, name: str) -> None:
            args = tiny[name]
            model = materialize(spec, args).eval()
            tokens = tokens_for(args)
            counted = 3 * counted_forward_flops(model, tokens) / tokens.numel()  # forward + backward (2x)
            assert spec.flops_per_token(args, seq_len) == pytest.approx(counted, rel=flops_rtol)

        @pytest.mark.parametrize("name", names)
        def test_state_dict_round_trip(self, name: str) -> None:
            import io

            args = tiny[name]
            model = materialize(spec, args).eval()
            randomize(model, 0)
            buffer = io.BytesIO()
            torch.save(model.state_dict(), buffer)
            buffer.seek(0)
            fresh = materialize(spec, args, seed=3).eval()
            fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
            tokens = tokens_for(args)
            with torch.no_grad():
                assert torch.equal(fresh(tokens), model(tokens))

        @pytest.mark.parametrize("name", names)
        @pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
        def test_hf_round_trip_and_logits_match_transformers(self, name: str, tmp_path: Path) -> None:
            if not hf or spec.hf_adapter is None:
                pytest.skip(f"{spec.name} declares no HF adapter")
            transformers = pytest.importorskip("transformers")
            import torch.distributed.checkpoint as dcp

            import plait
            from plait.hf import export_checkpoint_to_hf, load_hf_folder

            adapter, args = spec.hf_adapter, tiny[name]
            model = materialize(spec, args).eval()
            randomize(model, 0)
            hf_config = adapter.hf_config_from_args(args)
            again = adapter.args_from_hf_config(hf_config)
            assert adapter.hf_config_from_args(again) == hf_config  # configs convert both ways
            # a training checkpoint (model weights under "model", next to other state) -> a sharded HF folder
            dcp.save({"model": model.state_dict(), "train_state": {"step": torch.tensor(7)}},
                     checkpoint_id=str(tmp_path / "step-7"))  # fmt: skip
            export_checkpoint_to_hf(tmp_path / "step-7", spec, args, tmp_path / "hf", max_shard_bytes=60_000)
            assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
            _, hf_state = load_hf_folder(tmp_path / "hf")
            ours = adapter.from_hf(hf_state, again)
            back = adapter.to_hf(ours, again)
            assert set(back) == set(hf_state) and all(torch.equal(back[k], hf_state[k]) for k in back)
            fused = fuse_hf_experts(hf_state)
            if fused.keys() != hf_state.keys():  # MoE: the fused expert layout reads the same
                from_fused = adapter.from_hf(fused, again)
                assert from_fused.keys() == ours.keys() and all(torch.equal(from_fused[k], ours[k]) for k in ours)

            hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
            assert type(hf_model).__name__ in adapter.hf_architectures
            tokens = tokens_for(args)
            with torch.no_grad():
                torch.testing.assert_close(hf_model(tokens).logits, model(tokens), rtol=0, atol=1e-4)
            reloaded = plait.from_pretrained(spec.name, str(tmp_path / "hf"))
            for key, tensor in model.state_dict().items():
                assert torch.equal(reloaded.state_dict()[key], tensor), key

        @pytest.mark.parametrize("name", names)
        def test_cached_generation_matches_full_recompute(self, name: str) -> None:
            from plait.generation import KVCache, generate, supports_cache

            args = tiny[name]
            model = materialize(spec, args).eval()
            randomize(model, 0)
            tokens = tokens_for(args, length=12)
            if not supports_cache(model):  # generated by full recompute: the greedy continuation
                expected = tokens
                with torch.no_grad():
                    for _ in range(4):
                        expected = torch.cat((expected, model(expected)[:, -1].argmax(-1, keepdim=True)), dim=1)
                assert torch.equal(generate(model, tokens, max_new_tokens=4), expected)
                return
            with torch.no_grad():
                full = model(tokens)
                cache = KVCache(batch_size=2, max_len=12, device="cpu")
                steps = [model(tokens[:, :5], cache=cache), *(model(tokens[:, i:i + 1], cache=cache)
                                                               for i in range(5, 12))]  # fmt: skip
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
            mask = torch.ones_like(tokens)
            mask[1, :4] = 0  # the second prompt is 8 tokens, left-padded
            batched = generate(model, tokens, attention_mask=mask, max_new_tokens=6)
            assert torch.equal(batched, generate(model, tokens, attention_mask=mask, max_new_tokens=6,
                                                 use_cache=False))  # fmt: skip
            alone = generate(model, tokens[1:, 4:], max_new_tokens=6)
            assert torch.equal(batched[1, 12:], alone[0, 8:])

        @pytest.mark.parametrize("name", names)
        @pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
        def test_greedy_generation_matches_transformers(self, name: str, tmp_path: Path) -> None:
            if not hf or spec.hf_adapter is None:
                pytest.skip(f"{spec.name} declares no HF adapter")
            transformers = pytest.importorskip("transformers")
            import plait
            from plait.hf import save_hf_folder

            adapter, args = spec.hf_adapter, tiny[name]
            model = materialize(spec, args).eval()
            randomize(model, 0)
            save_hf_folder(tmp_path, adapter.hf_config_from_args(args), adapter.to_hf(model.state_dict(), args))
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
            ours = plait.from_pretrained(spec.name, str(tmp_path))
            tokens = tokens_for(args, batch=3, length=10)
            mask = torch.ones_like(tokens)
            mask[1, :3] = mask[2, :6] = 0  # prompts of 10, 7 and 4 tokens, left-padded
            with torch.no_grad():
                expected = hf_model.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)  # fmt: skip
            got = plait.generate(ours, tokens, attention_mask=mask, max_new_tokens=8)
            assert torch.equal(got, expected), (got[:, 10:], expected[:, 10:])

        @pytest.mark.parametrize("name", names)
        def test_one_training_step_is_finite(self, name: str) -> None:
            args = tiny[name]
            model = materialize(spec, args).train()
            before = {key: p.detach().clone() for key, p in model.named_parameters()}
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
            loss = loss_of(model, args, tokens_for(args))
            assert torch.isfinite(loss)
            loss.backward()
            grads = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
            assert grads and all(torch.isfinite(g).all() for g in grads.values())
            optimizer.step()
            moved = {key for key, p in model.named_parameters() if not torch.equal(p, before[key])}
            assert moved == {key for key, g in grads.items() if g.abs().sum() > 0}

        def test_parallelism_declarations_name_real_modules(self) -> None:
            from plait.model_spec import TPStyle
            import typing

            models = {name: spec.build_meta(tiny[name]) for name in names}
            paths = {path for model in models.values() for path, _ in model.named_modules() if path}
            if spec.tp_plan is not None:
                for pattern, style in spec.tp_plan.styles.items():
                    assert style in typing.get_args(TPStyle), (pattern, style)
                    assert any(pattern_matches(pattern, path) for path in paths), f"TP: {pattern} matches no module"
                for name in names:
                    for attribute in spec.tp_plan.divisible_by_tp:
                        value = dotted_attribute(tiny[name], attribute)
                        assert value is None or (isinstance(value, int) and value > 0), (name, attribute, value)
            for pattern in (*spec.cp_attention_modules, *spec.expert_modules):
                assert any(pattern_matches(pattern, path) for path in paths), f"{pattern} matches no module"
            if spec.cp_sequence_buffers:
                assert spec.cp_attention is not None
            for name, model in models.items():
                args = spec.follow_seq_len(tiny[name], seq_len) if spec.seq_len_arg else tiny[name]
                buffers = dict(spec.build_meta(args).named_buffers())
                for path, dim in spec.cp_sequence_buffers.items():
                    assert buffers[path].shape[dim] == (seq_len if spec.seq_len_arg else buffers[path].shape[dim])

        @pytest.mark.parametrize("name", names)
        def test_pipeline_stages_compose_to_the_whole_model(self, name: str) -> None:
            if spec.pipeline_split_points is None:
                pytest.skip(f"{spec.name} declares no pipeline split points")
            args = tiny[name]
            if getattr(args, "tie_word_embeddings", False):
                pytest.skip("tied embeddings cannot be pipelined")
            whole = materialize(spec, args).eval()
            container = getattr(whole, spec.block_container)
            n_stages = min(3, len(container))
            points = spec.pipeline_split_points(args, n_stages)
            modules = dict(whole.named_modules())
            assert len(points) == n_stages - 1 and all(point in modules for point in points), points
            order = list(container)
            starts = [0, *(order.index(p.rsplit(".", 1)[1]) for p in points), len(order)]
            hidden = tokens_for(args)
            with torch.no_grad():
                expected = whole(hidden)
                for stage in range(n_stages):
                    part = materialize(spec, args).eval()
                    part.load_state_dict(whole.state_dict())
                    keep = set(order[starts[stage]:starts[stage + 1]])
                    blocks = getattr(part, spec.block_container)
                    for key in [k for k in blocks if k not in keep]:
                        del blocks[key]
                    if stage > 0:
                        part.tok_embeddings = None
                    if stage < n_stages - 1:
                        part.norm = part.output = None
                    hidden = part(hidden)
            torch.testing.assert_close(hidden, expected)

    ModelConformance.__name__ = ModelConformance.__qualname__ = f"Test{spec.name.title().replace('_', '')}Conformance"
    return ModelConformance


def _rank_main() -> None:
    import torch

    torch.set_num_threads(1)
    from plait.cli import exit_process, train

    out, argv = sys.argv[1], sys.argv[2:]
    jobs: list[list[str]] = [[]]
    for arg in argv:
        if arg == JOB_SEPARATOR:
            jobs.append([])
        else:
            jobs[-1].append(arg)
    ports = os.environ.get(JOB_PORTS, "").split(",")
    results = []
    for index, job in enumerate(jobs):
        if index < len(ports) and ports[index]:
            os.environ["MASTER_PORT"] = ports[index]
        result = train(job)
        results.append({"losses": result.losses, "grad_norms": result.grad_norms,
                        "validation_losses": result.validation_losses})
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f)  # one job: its dict alone
    exit_process(0)


if __name__ == "__main__":
    _rank_main()
