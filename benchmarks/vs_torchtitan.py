"""plait and torchtitan on the same job, side by side, in one invocation.

    python benchmarks/vs_torchtitan.py --torchtitan-python /path/to/venv-tt/bin/python \\
        [--jobs debugmodel,100M] [--repeats 3] [--threads 1] [--seeds 3] [--json OUT] \\
        [--device cpu|cuda] [--dtype float32|bfloat16] [--compile]

For each job (``vs_torchtitan_jobs.py``: plait's llama3 ``debugmodel``, a ~100M model
for CPUs and a ~1B model for one GPU) it writes plait's embedded corpus and tokenizer to
files both systems read, then runs plait and torchtitan as separate processes, one after
the other, alternating which goes first, ``--repeats`` times, with the same thread count.
Between the pairs it times the job's matmuls (``gemm_throughput.py``). It prints, per
system, the medians of: steady-state tokens/s (warm-up steps left out), time to first
step (process start to the end of step 1), peak memory (RSS on CPU,
``max_memory_allocated`` on a GPU), the loss at the first and last step, MFU against the
nominal peak and against the measured matmul throughput, and the median over the repeats
of the ratio plait/torchtitan of each pair. It checks that both systems built the same
number of parameters, trained on the same first batch and followed the same learning rates.

torchtitan (0.3.0, with its dependencies) lives in its own environment: its pins clash
with plait's. It is an optional benchmark dependency, not a dependency of any plait
package. See benchmarks/README.md for how to create that environment.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

from vs_torchtitan_jobs import JOBS, Job

HERE = Path(__file__).resolve().parent
RUNNERS = {"plait": HERE / "vs_torchtitan_plait.py", "torchtitan": HERE / "vs_torchtitan_titan.py"}
SYSTEMS = ("plait", "torchtitan")
FLOAT8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
GIB = 2**30


# --------------------------------------------------------------------------- setup


def write_assets(folder: Path) -> None:
    """plait's embedded corpus as JSON lines and its tokenizer as a Hugging Face folder."""
    from plait.data.embedded import BOS_TOKEN, EOS_TOKEN, embedded_corpus, embedded_tokenizer, embedded_tokenizer_path

    embedded_tokenizer()  # trains and caches it if needed
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "tokenizer.json").write_text(embedded_tokenizer_path().read_text())
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "add_bos_token": False, "add_eos_token": False}))
    with open(folder / "corpus.jsonl", "w") as f:
        for document in embedded_corpus().documents:
            if document:  # plait skips empty documents; torchtitan would frame them with bos/eos
                f.write(json.dumps({"text": document}) + "\n")


def with_plait_schedule(job: Job) -> Job:
    """The job with plait's per-step LR factors (torchtitan's own schedule differs by one step)."""
    from plait.config import LRSchedulerSection
    from plait.optim import lr_factor

    section = LRSchedulerSection(warmup_steps=job.lr_warmup_steps)
    return job.with_overrides(lr_factors=tuple(lr_factor(i, total_steps=job.steps, section=section)
                                               for i in range(job.steps)))


def model_flops_per_token(job: Job) -> float:
    """plait's llama3 FLOPs formula (6 per non-embedding weight + attention); torchtitan's is the same."""
    from plait_llama3.spec import FLAVORS, flops_per_token

    return flops_per_token(dataclasses.replace(FLAVORS[job.plait_flavor], max_seq_len=job.seq_len), job.seq_len)


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def nominal_peak_flops(threads: int, device: str, dtype: str) -> float:
    """The datasheet peak plait's MFU uses: /proc/cpuinfo's vector width x clock per thread
    on CPU, the GPU's dense figure for the dtype."""
    from plait.builtin import cpu_peak_per_thread, cuda_capabilities
    from plait.capabilities import training_peak_flops

    if device == "cuda":
        return training_peak_flops(cuda_capabilities(), dtype)
    return cpu_peak_per_thread() * threads


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- runs


def child_env(threads: int, plait_data: str = "files", device: str = "cpu") -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), VS_TORCHTITAN_THREADS=str(threads),
               VS_TORCHTITAN_PORT=str(free_port()), VS_TORCHTITAN_PLAIT_DATA=plait_data,
               VS_TORCHTITAN_DEVICE=device, PYTHONUNBUFFERED="1")
    if device == "cpu":  # both systems take a GPU when they see one
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_system(system: str, python: str, job_file: Path, assets: Path, threads: int, tag: str,
               plait_data: str = "files") -> dict:
    """One training run in a fresh process; its result with tokens/s, TTFS and peak memory."""
    result_file, log_file = assets / f"{tag}.json", assets / f"{tag}.log"
    job = Job.from_json(job_file.read_text())
    with open(log_file, "w") as log:
        started = time.time()
        code = subprocess.call([python, str(RUNNERS[system]), str(job_file), str(assets), str(result_file)],
                               stdout=log, stderr=subprocess.STDOUT, env=child_env(threads, plait_data, job.device),
                               cwd=assets)
        wall = time.time() - started
    if code != 0 or not result_file.is_file():
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{system} run {tag} failed (exit code {code}); last lines of {log_file}:\n{tail}")
    result = json.loads(result_file.read_text())
    if result["device"] != job.device:
        raise SystemExit(f"{system} run {tag} trained on {result['device']}, the job is for {job.device}")
    ends, warmup = result["step_ends"], job.warmup_steps
    if len(ends) != job.steps:
        raise SystemExit(f"{system} run {tag}: {len(ends)} step timestamps for {job.steps} steps")
    losses = [result["losses"][str(step)] for step in range(1, job.steps + 1)]
    return {
        **result,
        "tokens_per_second": job.tokens_per_step * (job.steps - warmup) / (ends[-1] - ends[warmup - 1]),
        "time_to_first_step": result["first_step_wall"] - started,
        "peak_memory_bytes": result["peak_device_bytes"] if job.device == "cuda" else result["peak_rss_bytes"],
        "wall_seconds": wall,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def run_gemms(job: Job, threads: int, assets: Path, tag: str) -> float:
    out = assets / f"{tag}.json"
    subprocess.run([sys.executable, str(HERE / "gemm_throughput.py"), "--job", job.name, "--threads", str(threads),
                    "--device", job.device, "--dtype", job.dtype, "--json", str(out)],
                   check=True, env=child_env(threads, device=job.device), stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["flops_per_second"]


def check_same_job(job: Job, runs: dict[str, list[dict]]) -> None:
    """Both systems must have built the same model and trained on the same data and LRs
    with the same number of threads."""
    plait, titan = runs["plait"][0], runs["torchtitan"][0]
    problems = []
    if plait["parameters"] != titan["parameters"] or plait["parameters"] != job.shape.num_parameters():
        problems.append(f"parameters: plait {plait['parameters']:,}, torchtitan {titan['parameters']:,}, "
                        f"job {job.shape.num_parameters():,}")
    for key in ("threads", "compile", "float8"):
        if plait[key] != titan[key]:
            problems.append(f"{key}: plait {plait[key]}, torchtitan {titan[key]}")
    if plait["first_batch_sha256"] != titan["first_batch_sha256"]:
        problems.append(f"first batch: plait {plait['first_batch_sha256']}, torchtitan {titan['first_batch_sha256']}")
    for step in map(str, range(1, job.steps + 1)):
        if abs(plait["lrs"][step] - titan["lrs"][step]) > 1e-12:
            problems.append(f"lr at step {step}: plait {plait['lrs'][step]}, torchtitan {titan['lrs'][step]}")
            break
    if problems:
        raise SystemExit(f"job {job.name}: the two systems did not run the same job: " + "; ".join(problems))


# --------------------------------------------------------------------------- report


METRICS = (  # key, label, scale, format
    ("tokens_per_second", "tokens/s", 1, "{:,.0f}"),
    ("time_to_first_step", "time to first step (s)", 1, "{:.2f}"),
    ("peak_memory_bytes", "peak memory (GiB)", 1 / GIB, "{:.3f}"),
    ("loss_first", "loss, step 1", 1, "{:.4f}"),
    ("loss_last", "loss, last step", 1, "{:.4f}"),
    ("mfu_nominal", "MFU vs nominal peak (%)", 100, "{:.1f}"),
    ("mfu_gemm", "MFU vs measured GEMM (%)", 100, "{:.1f}"),
)


def summarize(job: Job, runs: dict[str, list[dict]], gemm_flops: list[float], flops_per_token: float,
              peak: float, seed_losses: list[float]) -> dict:
    gemm = max(gemm_flops)  # achievable: the best of the interleaved measurements
    for system_runs in runs.values():
        for run in system_runs:
            run["mfu_nominal"] = run["tokens_per_second"] * flops_per_token / peak
            run["mfu_gemm"] = run["tokens_per_second"] * flops_per_token / gemm
    table = {}
    for key, *_ in METRICS:
        ratios = [p[key] / t[key] for p, t in zip(runs["plait"], runs["torchtitan"])]
        table[key] = {
            "plait": statistics.median(r[key] for r in runs["plait"]),
            "torchtitan": statistics.median(r[key] for r in runs["torchtitan"]),
            "ratio": statistics.median(ratios),
            "ratio_range": (min(ratios), max(ratios)),
        }
    return {"job": dataclasses.asdict(job), "table": table, "gemm_flops_per_second": gemm,
            "gemm_flops_samples": gemm_flops, "flops_per_token": flops_per_token, "nominal_peak_flops": peak,
            "plait_last_loss_by_seed": seed_losses, "runs": runs}


def print_report(summary: dict, threads: int) -> None:
    job, table = summary["job"], summary["table"]
    shape = job["shape"]
    memory = "peak allocated" if job["device"] == "cuda" else "peak RSS"
    print(f"\n== {job['name']}: dim {shape['dim']}, {shape['n_layers']} layers, {shape['n_heads']} heads, vocab "
          f"{shape['vocab_size']}, ffn {shape['ffn_dim']}; batch {job['batch_size']} x seq {job['seq_len']}, "
          f"{job['steps']} steps ({job['warmup_steps']} warm-up excluded), {job['dtype']} on {job['device']}, "
          f"{'compiled' if job['compile'] else 'eager'}"
          f"{', float8 ' + job['float8'] if job['float8'] else ''}, {threads} thread(s); memory = {memory}")
    print(f"   {'':28} {'plait':>12} {'torchtitan':>12} {'plait/titan':>12}  (range over repeats)")
    for key, label, scale, fmt in METRICS:
        row = table[key]
        low, high = row["ratio_range"]
        print(f"   {label:28} {fmt.format(row['plait'] * scale):>12} {fmt.format(row['torchtitan'] * scale):>12} "
              f"{row['ratio']:>12.3f}  ({low:.3f}-{high:.3f})")
    print(f"   model FLOPs/token {summary['flops_per_token'] / 1e6:.2f} M; nominal peak "
          f"{summary['nominal_peak_flops'] / 1e9:.1f} GFLOP/s ({summary['device_name']}); measured step GEMMs "
          f"{summary['gemm_flops_per_second'] / 1e9:.1f} GFLOP/s (best of "
          f"{', '.join(f'{g / 1e9:.1f}' for g in summary['gemm_flops_samples'])})")
    first = {system: summary["runs"][system][0] for system in SYSTEMS}
    print("   " + "; ".join(f"{system} {first[system]['version']} (AdamW {first[system]['optimizer']})"
                            for system in SYSTEMS))
    delta = abs(table["loss_last"]["plait"] - table["loss_last"]["torchtitan"])
    seeds = summary["plait_last_loss_by_seed"]
    noise = max(seeds) - min(seeds) if len(seeds) > 1 else None
    noise_text = (f"spread of plait's last loss over seeds {job['seed']}..{job['seed'] + len(seeds) - 1}: "
                  f"{noise:.4f} ({', '.join(f'{x:.4f}' for x in seeds)})" if noise is not None else "not measured")
    print(f"   |last loss plait - torchtitan| = {delta:.4f}; seed-to-seed noise: {noise_text}")
    if job["device"] == "cuda":
        targets = [("MFU >= torchtitan's", table["mfu_nominal"]["ratio"] >= 1.0)]
    else:
        targets = [
            ("tokens/s >= 1.15 x torchtitan", table["tokens_per_second"]["ratio"] >= 1.15),
            ("peak RSS <= 0.9 x torchtitan", table["peak_memory_bytes"]["ratio"] <= 0.9),
            ("time to first step <= 0.5 x torchtitan", table["time_to_first_step"]["ratio"] <= 0.5),
        ]
        if job["name"] == "100M":
            targets.append(("model FLOP/s >= 50% of measured GEMM", table["mfu_gemm"]["plait"] >= 0.5))
    if noise is not None:
        targets.append(("last loss within seed noise", delta <= noise))
    print("   targets: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in targets))


def run_job(job: Job, args: argparse.Namespace, workdir: Path, pythons: dict[str, str]) -> dict:
    """Interleaved pairs (alternating which system goes first), GEMM timings between them,
    and plait runs with other seeds; the job's summary."""
    name = job.name
    job_file = workdir / f"{name}.job.json"
    job_file.write_text(job.to_json())
    runs: dict[str, list[dict]] = {system: [] for system in SYSTEMS}
    gemm_flops = []
    for repeat in range(args.repeats):
        order = SYSTEMS if repeat % 2 == 0 else SYSTEMS[::-1]
        for system in order:
            run = run_system(system, pythons[system], job_file, workdir, args.threads, f"{name}.{system}.{repeat}",
                             args.plait_data)
            runs[system].append(run)
            print(f"   {name} #{repeat} {system:10}: {run['tokens_per_second']:9,.0f} tokens/s, first step at "
                  f"{run['time_to_first_step']:.2f} s, peak memory {run['peak_memory_bytes'] / GIB:.3f} GiB, loss "
                  f"{run['loss_first']:.4f} -> {run['loss_last']:.4f}", flush=True)
        if repeat == 0:
            check_same_job(job, runs)  # before spending time on more pairs
        gemm_flops.append(run_gemms(job, args.threads, workdir, f"{name}.gemm.{repeat}"))
    seed_losses = [runs["plait"][0]["loss_last"]]
    for offset in range(1, args.seeds):
        other = workdir / f"{name}.seed{offset}.job.json"
        other.write_text(job.with_overrides(seed=job.seed + offset).to_json())
        seed_run = run_system("plait", sys.executable, other, workdir, args.threads, f"{name}.plait.seed{offset}",
                              args.plait_data)
        seed_losses.append(seed_run["loss_last"])
    summary = summarize(job, runs, gemm_flops, model_flops_per_token(job),
                        nominal_peak_flops(args.threads, job.device, job.dtype), seed_losses)
    summary["device_name"] = device_name(job.device)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torchtitan-python", default=os.environ.get("TORCHTITAN_PYTHON", ""),
                        help="python of the environment with torchtitan 0.3.0 (or $TORCHTITAN_PYTHON)")
    parser.add_argument("--jobs", default="debugmodel,100M", help=f"comma separated, of: {', '.join(JOBS)}")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs per job")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run (both systems)")
    parser.add_argument("--steps", type=int, help="override every job's steps")
    parser.add_argument("--plait-data", choices=("files", "embedded"), default="files",
                        help="plait reads the written corpus and tokenizer files (as torchtitan does), or its "
                             "embedded corpus and tokenizer (the same documents and tokens, no file parsing)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="plait runs with seeds seed..seed+N-1 (the first is the timed runs') whose spread "
                             "of the last loss is the noise the two systems' losses are compared with; 1 skips it")
    parser.add_argument("--keep", help="write runs, logs and assets to this folder and keep them (otherwise a "
                                       "temporary folder, removed after a successful run)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both systems train")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="compute dtype of every job (default: each job's own: fp32 on the CPU jobs, bf16 on 1B)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model and loss on both systems")
    parser.add_argument("--float8", choices=FLOAT8_RECIPES, default="",
                        help="train the linear layers in float8 with this torchao recipe on both systems "
                             "(plait's float8 plugin, torchtitan's float8 converter; emulated on CPU)")
    parser.add_argument("--json", help="write all figures to this file")
    args = parser.parse_args()
    if not args.torchtitan_python:
        parser.error("pass --torchtitan-python (or set TORCHTITAN_PYTHON): the python of torchtitan's environment")
    names = [name.strip() for name in args.jobs.split(",") if name.strip()]
    unknown = [name for name in names if name not in JOBS]
    if unknown or args.repeats < 1:
        parser.error(f"unknown job(s) {unknown}; choose from {', '.join(JOBS)}" if unknown else "--repeats >= 1")
    for name in names:
        if (args.steps or JOBS[name].steps) <= JOBS[name].warmup_steps:
            parser.error(f"job {name}: --steps must exceed its {JOBS[name].warmup_steps} warm-up steps")
    if args.float8 and args.compile and args.device == "cpu":
        parser.error("--float8 with --compile needs a GPU: on CPU float8 is emulated, which torchtitan "
                     "cannot compile; drop one of them")
    pythons = {"plait": sys.executable, "torchtitan": args.torchtitan_python}

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vs_torchtitan_"))
    workdir.mkdir(parents=True, exist_ok=True)
    write_assets(workdir)
    print(f"{datetime.date.today()} | {device_name(args.device)} | {cpu_model()}, {os.cpu_count()} cpus | "
          f"torch {torch.__version__} | "
          f"{args.threads} thread(s) | python {platform.python_version()} | plait data: {args.plait_data} | "
          f"files in {workdir}", flush=True)
    summaries = []
    try:
        for name in names:
            job = with_plait_schedule(JOBS[name].with_overrides(
                steps=args.steps or JOBS[name].steps, device=args.device, compile=args.compile,
                dtype=args.dtype or JOBS[name].dtype, float8=args.float8))
            summaries.append(run_job(job, args, workdir, pythons))
            print_report(summaries[-1], args.threads)
    except BaseException:
        print(f"runs, logs and assets are in {workdir}", file=sys.stderr)
        raise
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(datetime.date.today()), "cpu": cpu_model(),
                                               "device": device_name(args.device), "compile": args.compile,
                                               "float8": args.float8,
                                               "cpus": os.cpu_count(), "threads": args.threads,
                                               "plait_data": args.plait_data, "jobs": summaries}, indent=2))


if __name__ == "__main__":
    main()
