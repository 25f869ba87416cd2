"""The whole recipe through plait's own commands on a small qwen3: warm-start with
`plait train` on solved problems, `plait convert`, then `plait train --plugins rl` with
one generator process. One shared synchronous run (fixed seeds, so deterministic), a
short run with one policy version of lag allowed, and two-rank layouts."""
import statistics

import pytest

from plait.errors import ConfigError
from plait_rl.cli import ToyOptions, reward_curve, toy

WARMUP_STEPS, RL_STEPS, RL_LR = 200, 60, 5e-4
#: measured on this run: mean reward 0.27 over the first quarter, 0.39 over the last
MARGIN = 0.05
SMALL = ["--model", "qwen3", "--model.flavor", "debugmodel", "--model.args.n_layers", "2", "--model.args.dim", "128",
         "--model.args.n_heads", "4", "--model.args.n_kv_heads", "2", "--model.args.head_dim", "32",
         "--model.args.ffn_hidden_dim", "256"]  # fmt: skip
OPTIONS = dict(task="copy", digits=4, warmup_examples=2000, warmup_steps=WARMUP_STEPS, rl_steps=RL_STEPS, rl_lr=RL_LR,
               group_size=8, prompts_per_step=8)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """The one learning run the module shares: 20-45 s on 2 shared cores (warm-start 200
    steps, convert, 60 RL steps), since a reward curve needs that many steps to rise."""
    folder = tmp_path_factory.mktemp("toy")
    rewards = toy(ToyOptions(workdir=str(folder), **OPTIONS), ["--rl.generators", "1"], model=SMALL)
    return folder / "rl", rewards


def test_synchronous_steps_are_on_policy_ratio_exactly_one(run) -> None:
    folder, _ = run
    for tag, value in (("rl/policy_lag", 0.0), ("rl/ratio_min", 1.0), ("rl/ratio_max", 1.0), ("rl/clip_fraction", 0.0)):
        assert set(reward_curve(folder, tag).values()) == {value}, tag


def test_the_generator_stays_within_the_allowed_lag(run, tmp_path) -> None:
    """One version of lag allowed: the generator samples the next batch while the trainer
    trains; the first step is still on-policy, ratio exactly 1."""
    from plait.cli.commands import train

    folder, _ = run
    train(["--model", "qwen3", "--model.hf_dir", str(folder.parent / "warm_hf"), "--plugins", "rl", "--rl.task", "copy",
           "--rl.generators", "1", "--rl.max_policy_lag", "1", "--training.steps", "5", "--training.seq_len", "32",
           "--training.local_batch_size", "32", "--optimizer.lr", "5e-4", "--metrics.progress", "off",
           "--checkpoint.enable", "False", "--job.dump_folder", str(tmp_path)])  # fmt: skip
    lags = reward_curve(tmp_path, "rl/policy_lag")
    assert lags[1] == 0
    assert reward_curve(tmp_path, "rl/ratio_min")[1] == 1.0 == reward_curve(tmp_path, "rl/ratio_max")[1]
    assert set(lags.values()) <= {0.0, 1.0}
    assert 1.0 in lags.values(), "generation never overlapped a training step"
    versions = reward_curve(tmp_path, "rl/policy_version")
    assert all(versions[step] == step - 1 - lags[step] for step in versions)


def test_mean_reward_rises(run) -> None:
    _, rewards = run
    steps = sorted(rewards)
    first, last = steps[:RL_STEPS // 4], steps[-(RL_STEPS // 4):]
    before, after = statistics.mean(rewards[s] for s in first), statistics.mean(rewards[s] for s in last)
    assert after > before + MARGIN, (before, after)


@pytest.fixture(scope="module")
def parallel_job(run, tmp_path_factory: pytest.TempPathFactory):
    """Three RL steps from the warm-started model with rollouts generated in rank 0's
    process, and their gradient norms in one process (two micro-batches of 16)."""
    from plait.testing import train_in_this_process

    folder, _ = run
    common = ["--model", "qwen3", "--model.hf_dir", str(folder.parent / "warm_hf"), "--rl.task", "copy",
              "--training.steps", "3", "--training.seq_len", "32", "--training.global_batch_size", "32",
              "--optimizer.lr", "5e-4", "--metrics.progress", "off", "--checkpoint.enable", "False",
              "--rl.generators", "0"]  # fmt: skip
    single = train_in_this_process([*common, "--plugins", "rl", "--training.local_batch_size", "16",
                                    "--job.dump_folder", str(tmp_path_factory.mktemp("single"))])  # fmt: skip
    assert all(norm > 0.1 for norm in single["grad_norms"].values())
    return common, single["grad_norms"]


@pytest.mark.parametrize("layout", [
    ["--plugins", "rl,fsdp", "--training.local_batch_size", "8"],
    ["--plugins", "rl,tp", "--parallelism.tp", "2", "--parallelism.dp_shard", "1", "--training.local_batch_size", "16"],
], ids=["fsdp2", "tp2"])  # fmt: skip
def test_two_ranks_take_the_single_process_steps(parallel_job, layout, tmp_path) -> None:
    """The same rollouts, broadcast from rank 0, and the same RL steps: FSDP (each rank half
    of every micro-batch round) and TP with sequence and loss parallelism give one
    process's gradient norms."""
    from pathlib import Path

    from plait.testing import run_ranks

    common, single = parallel_job
    runs = run_ranks(2, [*common, *layout, "--job.dump_folder", str(tmp_path)], Path(tmp_path / "losses.json"))
    for step, norm in single.items():
        assert runs["grad_norms"][step] == pytest.approx(norm, rel=1e-5), step


@pytest.mark.parametrize(("options", "message"), [
    (["--training.local_batch_size", "6"], "must be a multiple of --rl.group_size 8"),
    (["--training.seq_len", "8"], "more than --training.seq_len 8"),
])  # fmt: skip
def test_shapes_the_loop_cannot_run_are_refused_before_any_work(tmp_path, options, message) -> None:
    from plait.cli.commands import train

    with pytest.raises(ConfigError, match=message):
        train([*SMALL, "--plugins", "rl", "--training.steps", "1", "--training.local_batch_size", "8",
               "--training.seq_len", "32", "--job.dump_folder", str(tmp_path), *options])
