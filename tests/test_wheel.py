"""The package as users get it: ``python -m build`` makes an sdist and a wheel, and the wheel,
installed (not editable) into a fresh virtual environment, imports, reports its backends and
computes the masked mean, with the native CPU kernel when a C compiler built it."""
import shutil
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import numpy
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = """
import sys, torch, gma_kernels
from gma_kernels import masked_mean
from gma_kernels.backends import native
from gma_kernels.info import report
assert gma_kernels.__file__.startswith(sys.prefix), gma_kernels.__file__
print(report())
g = torch.Generator().manual_seed(0)
u = torch.randn(5, 1003, generator=g)
w = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])
got = masked_mean(list(u), w.tolist(), tau=0.4, mask="soft")
x = u.double(); p = w.double() / w.sum()
agree = torch.sign(x).mean(0).abs()  # a_k = 1/K
want = torch.where(agree >= 0.4, 1.0, agree) * (p[:, None] * x).sum(0)  # soft: 1 or A
torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
print("native used:", native.usable())
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
                    "--outdir", str(out), str(REPO)], check=True, capture_output=True,
                   timeout=600)
    return out


def test_build_makes_an_sdist_with_the_c_source_and_a_wheel(dist):
    (sdist,) = dist.glob("gma_kernels-*.tar.gz")
    (wheel,) = dist.glob("gma_kernels-*.whl")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("gma_kernels/backends/csrc/gma_cpu.c") for n in names)
    assert wheel.stat().st_size > 0


def test_the_wheel_works_in_a_fresh_environment(dist, tmp_path):
    (wheel,) = dist.glob("gma_kernels-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=300)
    # torch and numpy are borrowed from this environment (a path, not its .pth files: the
    # editable install of the checkout is not seen)
    site = next((env / "lib").glob("python*/site-packages"))
    borrowed = {str(Path(m.__file__).parents[1]) for m in (torch, numpy)}
    (site / "borrowed.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    done = subprocess.run([str(python), "-c", SMOKE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert ("native used: True" in done.stdout) == bool(compiler), done.stdout
    assert "native CPU kernel" in done.stdout
