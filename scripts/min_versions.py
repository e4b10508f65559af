"""The oldest versions that `pyproject.toml` declares, as pip pins: the environment that `make test-min` tests.

    python scripts/min_versions.py                    # print `name==floor`, one direct dependency a line
    python scripts/min_versions.py --out FILE         # write them to FILE, a pip constraints file
    python scripts/min_versions.py --check-installed  # exit 1 unless this interpreter has exactly those versions

The direct dependencies are `[project] dependencies` and every extra a user installs (all of
`[project.optional-dependencies]` except `dev`, whose tools keep whatever pip resolves). Each one must carry a
`>=` floor: an unbounded dependency is refused, so a floor nobody tested cannot slip in. torch is left out of
the pins: the minimum-version run keeps the CPU build the Makefile names (`TORCH_CPU`), which must satisfy
torch's floor. pyproject.toml is the one source of truth: the pins are generated, never committed.
"""
import argparse, re, sys
from importlib import metadata
from pathlib import Path

try: import tomllib
except ModuleNotFoundError: import tomli as tomllib  # Python 3.10 (nbdev installs tomli there)

ROOT = Path(__file__).resolve().parent.parent
NOT_PINNED = {"torch"}  # installed by the Makefile from TORCH_CPU
TOOL_EXTRAS = {"dev"}   # test and docs tools: their versions are pip's choice
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")
RELEASE = re.compile(r"^\d+(\.\d+)*$")

def canonical(name):
    "The PEP 503 form of a distribution name: `PyYAML` and `pyyaml`, `huggingface-hub` and `huggingface_hub` agree."
    return re.sub(r"[-_.]+", "-", name).lower()

def release(version):
    "A plain release version as a tuple without trailing zeros (`1.8` and `1.8.0` are one floor)."
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0: parts.pop()
    return tuple(parts)

def requirements(pyproject=ROOT / "pyproject.toml"):
    "`(group, requirement)` for each direct dependency: `core` or the extra's name; self-references are skipped."
    project = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]
    groups = {"core": project.get("dependencies", []), **project.get("optional-dependencies", {})}
    for group, reqs in groups.items():
        if group in TOOL_EXTRAS: continue
        for req in reqs:
            if canonical(REQUIREMENT.match(req).group(1)) != canonical(project["name"]): yield group, req

def floor(req, where="pyproject.toml"):
    "`(name, version)` of a requirement's `>=` lower bound; a requirement without one (or with `==`) is an error."
    m = REQUIREMENT.match(req)
    if not m: raise ValueError(f"{where}: cannot read the requirement {req!r}")
    name, spec = m.group(1), m.group(3)
    floors = [s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")]
    if len(floors) != 1 or any(s.strip().startswith(("==", "~=", "===")) for s in spec.split(",")):
        raise ValueError(f"{where}: {name!r} needs exactly one lower bound `>=X` (the oldest version it is "
                         f"tested with), found {spec or 'none'!r}")
    if not RELEASE.match(floors[0]):
        raise ValueError(f"{where}: the floor of {name!r} must be a release like 1.2.3, found {floors[0]!r}")
    return name, floors[0]

def floors(pyproject=ROOT / "pyproject.toml"):
    "`{name: floor}` of every direct dependency, in pyproject's order; a package declared twice must agree."
    found = {}
    for group, req in requirements(pyproject):
        name, version = floor(req, f"{Path(pyproject).name} [{group}]")
        old = found.get(canonical(name))
        if old and release(old[1]) != release(version):
            raise ValueError(f"{Path(pyproject).name}: {name!r} has two floors, {old[1]} and {version}")
        found[canonical(name)] = (name, version)
    return {name: version for name, version in found.values()}

def pins(pyproject=ROOT / "pyproject.toml"):
    "The constraints file's text: `name==floor` for each direct dependency but torch."
    return "".join(f"{name}=={version}\n" for name, version in floors(pyproject).items()
                   if canonical(name) not in NOT_PINNED)

def mismatches(pyproject=ROOT / "pyproject.toml"):
    "`name: installed X, floor Y` for each pinned dependency whose installed version is not its floor."
    problems = []
    for name, version in floors(pyproject).items():
        if canonical(name) in NOT_PINNED: continue
        try: installed = metadata.version(name)
        except metadata.PackageNotFoundError: installed = None
        if installed is None: problems.append(f"{name}: not installed, floor {version}")
        elif not RELEASE.match(installed) or release(installed) != release(version):
            problems.append(f"{name}: installed {installed}, floor {version}")
    return problems

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", default=ROOT / "pyproject.toml", type=Path, help="the pyproject.toml to read")
    ap.add_argument("--out", type=Path, help="write the pins to this file instead of printing them")
    ap.add_argument("--check-installed", action="store_true",
                    help="exit 1 unless every pinned dependency is installed here at exactly its floor")
    args = ap.parse_args(argv)
    try:
        if args.check_installed:
            problems = mismatches(args.pyproject)
            for p in problems: print(f"min_versions: {p}", file=sys.stderr)
            if problems: return 1
            count = len(pins(args.pyproject).splitlines())
            print(f"min_versions: all {count} pinned dependencies are installed at their floors")
            return 0
        text = pins(args.pyproject)
    except (OSError, ValueError, KeyError) as e:
        print(f"min_versions: error: {e}", file=sys.stderr)
        return 2
    if args.out: args.out.write_text(text, encoding="utf-8")
    else: sys.stdout.write(text)
    return 0

if __name__ == "__main__": sys.exit(main())
