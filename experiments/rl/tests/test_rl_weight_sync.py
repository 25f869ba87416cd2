"""Weights from the trainer reach the generator exactly, with the policy version."""
import torch
import torch.multiprocessing as mp

from plait_rl.weights import SharedWeights, full_state_dict, load_reference


def test_after_a_sync_generator_and_trainer_parameters_are_identical(tiny_setup, trainer_model) -> None:
    import copy

    trainer = copy.deepcopy(trainer_model)
    generator_model = tiny_setup.build_model()
    weights = SharedWeights(full_state_dict(trainer), version=0, context=mp.get_context("spawn"),
                            with_reference=True)
    assert weights.pull(generator_model, have=-1) == 0

    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
    trainer(torch.randint(0, 2048, (2, 8))).float().square().mean().backward()
    optimizer.step()
    weights.publish(full_state_dict(trainer), version=1)
    assert weights.version == 1
    assert weights.pull(generator_model, have=0) == 1

    theirs = dict(generator_model.named_parameters())
    for name, param in trainer.named_parameters():
        assert torch.equal(param.detach(), theirs[name].detach()), name
    # the reference stays at the first version
    reference = load_reference(generator_model, weights)
    first = dict(trainer_model.named_parameters())
    assert all(torch.equal(p, first[n].detach()) for n, p in reference.named_parameters())
    assert not any(torch.equal(p, first[n].detach()) for n, p in generator_model.named_parameters()
                   if p.requires_grad and n.endswith("wq.weight"))


def test_a_generator_waits_for_the_version_it_needs(tiny_setup, trainer_model) -> None:
    weights = SharedWeights(full_state_dict(trainer_model), version=3, context=mp.get_context("spawn"))
    assert weights.wait_for(3)
    weights.stop()
    assert not weights.wait_for(4, poll_seconds=0.01)  # stopped: gives up instead of waiting forever
