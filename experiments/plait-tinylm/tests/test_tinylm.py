"""plait-tinylm runs the conformance suite every plait model package runs."""
from plait.testing import model_conformance
from plait_tinylm.model import SPEC, TinyLMArgs

TestTinyLMConformance = model_conformance(SPEC, tiny={"debug": TinyLMArgs(vocab_size=96, dim=32, max_seq_len=64)})
