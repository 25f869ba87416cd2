"""The shared recipe builders give complete, valid configs for any model name."""
from plait.recipes import debug_recipe, pretraining_recipe


def test_debug_recipe_is_valid_and_small():
    config = debug_recipe("mymodel", "debugmodel", "a debug run")
    config.validate()
    assert (config.model.name, config.model.flavor, config.job.description) == ("mymodel", "debugmodel", "a debug run")
    assert config.training.seq_len == 256 and config.training.dtype == "float32"


def test_pretraining_recipe_sets_the_gpu_defaults():
    config = pretraining_recipe("mymodel", "7B", lr=3e-4, steps=1000, seq_len=4096)
    config.validate()
    assert config.training.seq_len == 4096 and config.training.steps == 1000
    assert config.optimizer.lr == 3e-4 and config.optimizer.implementation == "fused"
    assert config.training.dtype == "bfloat16" and config.compile.enable
    assert config.job.description == "mymodel 7B pretraining"
    assert config.model.vocab == "flavor"  # the published vocabulary, for the model's own tokenizer
