import pytest
import torch

from plait.plugins import load_model_spec
from plait.testing import materialize
from plait_rl.config import RLSection
from plait_rl.generator import Generator, GeneratorSetup

# a qwen3 small enough for CPU tests, on the embedded tokenizer's 2048 ids
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden_dim=128, vocab_size=2048,
            max_seq_len=64)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_setup() -> GeneratorSetup:
    import dataclasses

    torch.set_num_threads(1)
    spec = load_model_spec("qwen3")
    args = dataclasses.replace(spec.args_for("debugmodel"), **TINY)
    return GeneratorSetup(model_name="qwen3", model_args=args, tokenizer="", bos_token="", eos_token="",
                          rl=RLSection(group_size=4, max_new_tokens=6), prompts_per_batch=4, micro_batch_rows=4)


@pytest.fixture(scope="module")
def trainer_model(tiny_setup: GeneratorSetup) -> torch.nn.Module:
    return materialize(load_model_spec("qwen3"), tiny_setup.model_args, seed=3).train()


@pytest.fixture(scope="module")
def generator(tiny_setup: GeneratorSetup, trainer_model: torch.nn.Module) -> Generator:
    model = tiny_setup.build_model()
    model.load_state_dict(trainer_model.state_dict())
    return Generator(tiny_setup, model)
