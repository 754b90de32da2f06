"""`pip install .` gives a package that works from any directory: its wheel holds every module, the presets and
the demo model, found through the installed package rather than the checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = folder.glob("lvlm_interpret-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder / "site")
    return folder / "site"


def test_the_wheel_holds_every_module_preset_and_the_demo_model(unpacked_wheel):
    package = unpacked_wheel / "lvlm_interpret"
    modules = {p.relative_to(ROOT / "lvlm_interpret") for p in (ROOT / "lvlm_interpret").rglob("*.py")}
    assert modules <= {p.relative_to(package) for p in package.rglob("*.py")}
    configs = {p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.json")}
    assert configs <= {p.relative_to(package / "_configs") for p in (package / "_configs").rglob("*.json")}
    demo = {p.name for p in (ROOT / "assets" / "demo-model").iterdir()}
    assert demo <= {p.name for p in (package / "_assets" / "demo-model").iterdir()}
    entry_points = next(unpacked_wheel.glob("*.dist-info")) / "entry_points.txt"
    assert "lvlm-interpret = lvlm_interpret.cli:run" in entry_points.read_text()


def test_the_installed_package_finds_its_data_from_any_directory(unpacked_wheel, tmp_path):
    probe = ("from lvlm_interpret.models.loading import BUILTIN_MODELS, random_presets; "
             "from lvlm_interpret.resources import CONFIGS_DIR, EXAMPLES_DIR; "
             "print(CONFIGS_DIR); print(BUILTIN_MODELS['demo']); print(EXAMPLES_DIR); print(len(random_presets()))")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env={"PYTHONPATH": str(unpacked_wheel), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert shown.returncode == 0, shown.stderr[-2000:]
    configs, demo, examples, presets = shown.stdout.split()
    for folder in (configs, demo, examples):
        assert Path(folder).is_dir() and Path(folder).is_relative_to(unpacked_wheel)
    assert int(presets) == len(list((ROOT / "configs").glob("random-*.json")))


def test_the_console_script_runs_the_same_commands(tmp_path):
    script = Path(sys.executable).parent / "lvlm-interpret"
    shown = subprocess.run([str(script), "explain", "--help"], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: lvlm-interpret explain")
