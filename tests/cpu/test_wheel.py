"""A wheel built from this tree carries its package data: ``calibrate`` runs from the installed wheel.

Built with ``pip wheel --no-build-isolation`` from a copy of the tree (setuptools >= 70 builds wheels
itself, offline), installed with ``pip install --target`` (no venv), run with that directory first on
the path and the source tree absent from it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pip(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=240, cwd=cwd)


def test_wheel_has_calibration_data_and_calibrate_runs(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "dwdp_comm", src / "dwdp_comm", ignore=shutil.ignore_patterns("__pycache__"))
    p = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "wheels"),
             str(src), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    wheels = list((tmp_path / "wheels").glob("dwdp_comm-*.whl"))
    assert len(wheels) == 1, wheels
    site = tmp_path / "site"
    p = _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheels[0]), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (site / "dwdp_comm" / "bench" / "calibration_h200x4.json").is_file()

    env = dict(os.environ, PYTHONPATH=str(site))
    code = ("import dwdp_comm, sys; print(dwdp_comm.__file__, file=sys.stderr); "
            "from dwdp_comm.bench.cli import main; raise SystemExit(main(['calibrate']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert Path(run.stderr.strip().splitlines()[-1]).resolve().is_relative_to(site.resolve()), run.stderr
    assert "# worst error" in run.stdout and "| row |" in run.stdout
    assert "/work/" not in run.stdout and "calibration_h200x4.json" in run.stdout
