"Contracts of `scripts/min_versions.py`: the pins of the minimum-version run are pyproject.toml's floors."
import importlib.util, json, re, subprocess, sys
from importlib import metadata
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "min_versions.py"
spec = importlib.util.spec_from_file_location("min_versions", SCRIPT)
mv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mv)

# What the package imports, by distribution: each must be declared with a floor.
DIRECT = {"transformers", "tokenizers", "accelerate", "huggingface-hub", "safetensors", "numpy", "pillow", "fastcore",
          "tqdm", "pyyaml", "matplotlib", "sentencepiece", "protobuf", "defusedxml", "pydicom", "nibabel", "openai",
          "deepspeed", "peft", "ipywidgets", "pyarrow", "fastapi", "uvicorn", "torch",
          "torchvision", "num2words", "tensorboard"}

def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)

def write_pyproject(path, deps, extras=None):
    "A pyproject.toml declaring `deps` and the optional groups `extras`."
    lines = ['[project]', 'name = "demo"', f"dependencies = {json.dumps(list(deps))}",
             "[project.optional-dependencies]"]
    lines += [f"{k} = {json.dumps(list(v))}" for k, v in (extras or {}).items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

def test_every_direct_dependency_has_a_floor_and_is_pinned_at_it():
    floors = {mv.canonical(k): v for k, v in mv.floors().items()}  # raises on a dependency without `>=`
    assert set(floors) == DIRECT, set(floors) ^ DIRECT
    pins = dict(line.split("==") for line in run().stdout.splitlines())
    assert {mv.canonical(k) for k in pins} == DIRECT - {"torch"}
    for name, version in pins.items(): assert floors[mv.canonical(name)] == version, name
    dev = mv.tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(d.startswith("llavamed[") and "all" in d and "parquet" in d for d in dev), dev

def test_the_makefiles_cpu_torch_satisfies_torchs_floor_and_test_min_uses_the_pins():
    make = (ROOT / "Makefile").read_text()
    torch_cpu = re.search(r"^TORCH_CPU \?= torch==([\d.]+)$", make, re.M).group(1)
    assert mv.release(torch_cpu) >= mv.release(mv.floors()["torch"])
    assert "scripts/min_versions.py --out $(MIN_VENV)/minimum.txt" in make
    assert "-c $(MIN_VENV)/minimum.txt" in make and "min_versions.py --check-installed" in make
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    assert ci.index("make test") < ci.index("make test-min"), ci

def test_floors_are_read_from_every_user_extra_but_not_the_tools(tmp_path):
    py = write_pyproject(tmp_path / "pyproject.toml", ["numpy>=1.26", "torch>=2.2", 'pillow>=10.0.1; python_version>"3"'],
                         {"med": ["pydicom>=3.0.1,<4"], "all": ["demo[med]"], "dev": ["pytest"]})
    assert mv.floors(py) == {"numpy": "1.26", "torch": "2.2", "pillow": "10.0.1", "pydicom": "3.0.1"}
    assert mv.pins(py) == "numpy==1.26\npillow==10.0.1\npydicom==3.0.1\n"
    out = tmp_path / "pins.txt"
    assert run("--pyproject", py, "--out", out).returncode == 0
    assert out.read_text() == mv.pins(py)

@pytest.mark.parametrize("dep, words", [("numpy", "'numpy' needs exactly one lower bound"),
                                        ("numpy==1.26", "found '==1.26'"),
                                        ("numpy>=1.26rc1", "must be a release like 1.2.3")])
def test_a_dependency_without_a_plain_floor_is_refused(tmp_path, dep, words):
    py = write_pyproject(tmp_path / "pyproject.toml", ["tqdm>=4.62", dep])
    res = run("--pyproject", py)
    assert res.returncode == 2 and words in res.stderr and "[core]" in res.stderr, res.stderr
    assert res.stdout == ""

def test_two_floors_for_one_package_are_refused(tmp_path):
    py = write_pyproject(tmp_path / "pyproject.toml", ["huggingface_hub>=1.3"], {"hub": ["huggingface-hub>=1.4"]})
    with pytest.raises(ValueError, match="two floors, 1.3 and 1.4"): mv.floors(py)

def test_check_installed_names_each_package_not_at_its_floor(tmp_path):
    pytest_version = metadata.version("pytest")
    at_floor = write_pyproject(tmp_path / "at.toml", [f"pytest>={pytest_version}.0", "torch>=0.1"])
    res = run("--pyproject", at_floor, "--check-installed")
    assert res.returncode == 0 and "all 1 pinned dependencies are installed at their floors" in res.stdout, res.stderr
    above = write_pyproject(tmp_path / "above.toml", ["pytest>=1.0", "no-such-package-here>=1.0"])
    res = run("--pyproject", above, "--check-installed")
    assert res.returncode == 1, res.stdout
    assert f"pytest: installed {pytest_version}, floor 1.0" in res.stderr, res.stderr
    assert "no-such-package-here: not installed, floor 1.0" in res.stderr, res.stderr
