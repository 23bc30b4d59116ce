"""The built wheel is the whole product: installed into a fresh target, without this checkout on
the path, its commands work from another directory, and it installs `clipgram` and nothing else."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp / "dist"),
                    str(ROOT)], check=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("clipgram-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(tmp / "site"), str(wheel)], check=True, cwd=tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return wheel, tmp / "site", elsewhere


def _run(installed, *args):
    _, site, elsewhere = installed
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("CLIPGRAM_DATA_DIR", None)
    return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_wheel_holds_one_package_with_its_settings_demo_and_model_configs(installed):
    names = zipfile.ZipFile(installed[0]).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"clipgram"}
    for shipped in ("clipgram/configs/default.toml", "clipgram/configs/demo.toml",
                    "clipgram/configs/accounts.toml", "clipgram/flows/ingest.py",
                    "clipgram/models/configs/clipgram-tiny-clip.json",
                    "clipgram/models/configs/clipgram-tiny-coca.json",
                    "clipgram/demo_profile/2026-06-01_15-00-00_UTC.json",
                    "clipgram/demo_profile/images/CgDemo0000.jpg"):
        assert shipped in names, shipped


def test_the_installed_package_loads_its_settings_from_anywhere(installed):
    _, site, _ = installed
    out = _run(installed, "-c", "import clipgram, clipgram.config as c; "
               "print(clipgram.__file__); print(c.load_config().download.max_bytes)")
    assert out.returncode == 0, out.stderr
    where, max_bytes = out.stdout.split()
    assert Path(where).is_relative_to(site) and int(max_bytes) > 0


def test_the_installed_commands_run_from_another_directory(installed, tmp_path):
    demo = _run(installed, "-m", "clipgram.cli", "demo", "--help")
    assert demo.returncode == 0 and "demo" in demo.stdout, demo.stderr
    status = _run(installed, "-m", "clipgram.cli", "status", "--data-dir", str(tmp_path / "empty"))
    assert status.returncode == 0, status.stderr
