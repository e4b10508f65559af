"""Write `configs/` from the Python presets: the stage recipes (`llavamed.train.RECIPES`) as YAML and the
DeepSpeed configs (`llavamed.train.DEEPSPEED_CONFIGS`) as JSON, so the shipped files and the package agree.

    python scripts/write_configs.py           # (re)write the files
    python scripts/write_configs.py --check   # write nothing; exit 1 naming every missing or stale file
"""
import argparse, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def expected_files() -> dict[Path, str]:
    "Every generated file of `configs/` with the text it must hold."
    from llavamed.train import DEEPSPEED_CONFIGS, RECIPES, recipe_yaml
    files = {ROOT / "configs" / f"{r.file}.yaml": recipe_yaml(r) for r in RECIPES}
    files.update({ROOT / "configs" / f"{name}.json": json.dumps(cfg, indent=2) + "\n"
                  for name, cfg in DEEPSPEED_CONFIGS.items()})
    return files


def main(argv: list[str] | None = None) -> int:
    "Write the files, or with `--check` report the stale ones; returns the exit status."
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; fail when a file differs from the presets")
    args = ap.parse_args(argv)
    files = expected_files()
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for p in stale: print(f"stale: {p.relative_to(ROOT)} (run `python scripts/write_configs.py`)", file=sys.stderr)
        print(f"configs: {len(files) - len(stale)} of {len(files)} generated files up to date")
        return 1 if stale else 0
    for p in stale: p.write_text(files[p], encoding="utf-8")
    print(f"configs: wrote {len(stale)} of {len(files)} files" + "".join(f"\n  {p.relative_to(ROOT)}" for p in stale))
    return 0


if __name__ == "__main__": sys.exit(main())
