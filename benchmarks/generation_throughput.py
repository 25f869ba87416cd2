"""Generation tokens/s on this machine for the debug models, with and without the
key/value cache, side by side in one run.

    python benchmarks/generation_throughput.py [--batch 4] [--prompt-len 32] [--new 64] [--repeats 3] [--threads N]

Each model is the flavor's architecture with randomly initialized weights (throughput does
not depend on what the weights say); every prompt is ``--prompt-len`` tokens, greedy, no
end-of-text stop, so every row generates exactly ``--new`` tokens. Without the cache
(``use_cache=False``) the whole sequence is recomputed for every token. The median of
``--repeats`` timed runs after one warm-up is reported.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

MODELS = (("llama3", "debugmodel"), ("qwen3", "debugmodel_moe"), ("deepseek_v3", "debugmodel"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    import plait
    from plait.plugins import load_model_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new} new tokens per row, greedy, float32")
    print(f"{'model':<28} {'params':>10} {'cached tok/s':>13} {'uncached tok/s':>15} {'speed-up':>9}")
    for name, flavor in MODELS:
        spec = load_model_spec(name)
        torch.manual_seed(0)
        model = spec.build_initialized(spec.args_for(flavor)).eval()
        prompt = torch.randint(0, 2048, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
        rates = {}
        for use_cache in (True, False):
            plait.generate(model, prompt, max_new_tokens=4, use_cache=use_cache)  # warm-up
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                out = plait.generate(model, prompt, max_new_tokens=args.new, use_cache=use_cache)
                seconds.append(time.perf_counter() - started)
            assert out.shape == (args.batch, args.prompt_len + args.new)
            rates[use_cache] = args.batch * args.new / statistics.median(seconds)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name + '/' + flavor:<28} {params / 1e6:>9.2f}M {rates[True]:>13,.1f} {rates[False]:>15,.1f} "
              f"{rates[True] / rates[False]:>8.2f}x")


if __name__ == "__main__":
    main()
