import torch

from plait_tinylm.model import SPEC


def test_builds_on_meta_then_initializes_and_is_causal():
    args = SPEC.flavors["debugmodel"]
    with torch.device("meta"):
        model = SPEC.build(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, args.vocab_size)
    changed = tokens.clone()
    changed[:, 10:] = 0
    assert torch.allclose(model(changed)[:, :10], logits[:, :10])  # the future does not leak
    assert SPEC.flops_per_token(args, 16) > 0
