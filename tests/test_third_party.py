"""An out-of-tree model package, pip-installed, trains through `plait train`."""
import os
import site
import subprocess
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "experiments" / "plait-tinylm"


def test_pip_install_then_train(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # The new environment sees this one's packages (plait, torch, pip) as a second site dir,
    # so the install below goes into the new environment only.
    child_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in site.getsitepackages() if os.path.isdir(p)]
    Path(child_site, "outer_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in outer) + "\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(PACKAGE)],
        env=env, check=True, capture_output=True,
    )
    listing = subprocess.run([python, "-m", "plait.cli", "plugins"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "tinylm" in listing.stdout and "tinylm_debug" in listing.stdout
    run = subprocess.run(
        [python, "-m", "plait.cli", "train", "--config", "tinylm_debug", "--training.steps", "8",
         "--metrics.progress", "off", "--job.dump_folder", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "model tinylm (debugmodel)" in run.stdout
    assert (tmp_path / "run" / "checkpoint" / "step-8").is_dir()
