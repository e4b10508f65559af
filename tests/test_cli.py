"The `llavamed` console command: discovery, errors and exit codes as a shell user sees them."
import json, subprocess
from llavamed.cli import COMMANDS, main

def run(cmd, *args):
    return subprocess.run([cmd, *args], capture_output=True, text=True)

def test_help_lists_every_command(llavamed_cmd):
    r = run(llavamed_cmd, "--help")
    assert r.returncode == 0
    for name in COMMANDS: assert f"  {name}" in r.stdout

def test_each_command_has_help(llavamed_cmd):
    for name in COMMANDS:
        r = run(llavamed_cmd, name, "--help")
        assert r.returncode == 0 and f"usage: llavamed {name}" in r.stdout, (name, r.stderr)

def test_unknown_command_suggests(llavamed_cmd):
    r = run(llavamed_cmd, "inf")
    assert r.returncode == 2 and "did you mean 'info'" in r.stderr

def test_info_runs(llavamed_cmd):
    r = run(llavamed_cmd, "info")
    assert r.returncode == 0 and "torch" in r.stdout

def test_info_lists_every_preset_and_whether_each_family_runs(llavamed_cmd):
    import importlib.util, json
    from llavamed.families import FAMILIES, TINY_PRESETS
    r = run(llavamed_cmd, "--json", "info")
    values = json.loads(r.stdout)["values"]
    assert set(TINY_PRESETS) <= set(values["presets"].split(", ")), values["presets"]
    have_tv = importlib.util.find_spec("torchvision") is not None
    for name, fam in FAMILIES.items():
        ok = values[f"family {name}"]
        if "torchvision" in fam.needs and not have_tv: assert "torchvision" in ok, (name, ok)
        elif not fam.needs: assert ok is True, (name, ok)

def test_main_returns_status():
    assert main(["--version"]) == 0 and main([]) == 2

def test_json_flag_before_or_after_the_command(llavamed_cmd):
    import json
    for args in (["--json", "info"], ["info", "--json"]):
        r = run(llavamed_cmd, *args)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["values"]["llavamed"], args


# settings dataclasses flattened into flags: a toy in the shape of `train` (a module, so docments reads comments)
import dataclasses
import pytest
from llavamed.cli import settings_kwargs, settings_parser


@dataclasses.dataclass
class ToyStage:
    lr: float = 2e-5  # peak learning rate
    parts: tuple[str, ...] = ("projector",)  # parts that learn
    checkpointing: bool | None = None  # gradient checkpointing (None: automatic)

    @classmethod
    def load(cls, name: str, **overrides):
        if name not in ("align", "instruct"): raise ValueError(f"stage: unknown preset {name!r}")
        return dataclasses.replace(cls(lr=2e-3 if name == "align" else 2e-5), **overrides)


@dataclasses.dataclass
class ToyRun:
    data: str  # training records (required)
    out: str = "runs/stage"  # output folder
    resume: bool = False  # continue from the last checkpoint
    max_steps: int | None = None  # stop after this many steps


def toy_train(stage: ToyStage | str = "instruct",  # a preset name
              run: ToyRun | None = None,  # where and how to run
              callbacks: list | None = None,  # Python callers only: no flag
             ):
    "Train a toy stage."
    return stage, run


def parse(*args):
    return settings_kwargs(toy_train, vars(settings_parser(toy_train, "llavamed toy").parse_args(list(args))))


def test_settings_flags_rebuild_the_dataclasses():
    got = parse("--stage", "align", "--data", "d.json", "--parts", "projector", "llm", "--checkpointing", "false",
                "--max-steps", "3", "--resume")
    assert got == {"stage": ToyStage(lr=2e-3, parts=("projector", "llm"), checkpointing=False),
                   "run": ToyRun(data="d.json", resume=True, max_steps=3)}
    # an unset override leaves the preset's value; an explicit one replaces it
    assert parse("--data", "d.json")["stage"] == ToyStage()
    assert parse("--data", "d.json", "--lr", "0.5")["stage"].lr == 0.5


def test_settings_help_comes_from_the_field_comments():
    text = settings_parser(toy_train, "llavamed toy").format_help()
    for flag, comment in [("--lr", "peak learning rate"), ("--max-steps", "stop after this many steps"),
                          ("--resume", "continue from the last checkpoint"), ("--stage", "a preset name")]:
        assert flag in text and comment in text, flag
    assert "--callbacks" not in text


def test_settings_bad_values_are_argparse_errors(capsys):
    for args in (["--data", "d", "--lr", "fast"], ["--data", "d", "--checkpointing", "maybe"], []):
        with pytest.raises(SystemExit) as e: parse(*args)
        assert e.value.code == 2
    assert "required: --data" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(llavamed_cmd, tmp_path):
    missing = tmp_path / "missing.json"
    r = run(llavamed_cmd, "validate", str(missing))
    assert r.returncode == 2 and r.stderr.strip() == f"llavamed validate: error: no such file: {missing}", r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = run(llavamed_cmd, "--debug", "validate", str(missing))
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_off_flags_say_what_they_turn_off(llavamed_cmd):
    r = run(llavamed_cmd, "evaluate", "--help")
    line = next(l for l in r.stdout.splitlines() if l.strip().startswith("--no-write-report"))
    assert "turn off: write report.md" in line and "(default: True)" not in line, line


def test_bad_settings_values_are_one_line(llavamed_cmd, tmp_path):
    "A preset or field value the settings dataclasses refuse is the same one-line error as any bad input."
    for args, said in ((["--stage", "nope"], "stage: 'nope' is neither a preset"),
                       (["--stage", "align", "--epochs", "-1"], "StageConfig.epochs: must be > 0")):
        r = run(llavamed_cmd, "train", *args, "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().startswith("llavamed train: error: ") and said in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()


def test_json_stdout_holds_the_json_alone(tmp_path, monkeypatch, capfd):
    "Notices that libraries print while a command runs (DeepSpeed's, at Python or C level) go to stderr under --json."
    (tmp_path / "noisy_command.py").write_text(
        "import os\nfrom llavamed.cli import Info\n"
        "def noisy() -> Info:\n"
        "    'A command whose libraries print while it runs.'\n"
        "    print('notice from Python'); os.write(1, b'notice from C\\n')\n"
        "    return Info({'answer': 42})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "noisy", ("noisy_command", "noisy", "prints notices"))
    assert main(["--json", "noisy"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"values": {"answer": 42}}, out
    assert "notice from Python" in err and "notice from C" in err
    assert main(["noisy"]) == 0  # without --json the notices stay where the library put them
    out, _ = capfd.readouterr()
    assert "notice from Python" in out and "answer" in out


def test_a_list_flag_given_twice_adds_up():
    "`--data a --data b` trains on both (argparse alone would keep only the last)."
    from llavamed.cli import command_parser, settings_kwargs
    func, parser = command_parser("train")
    args = vars(parser.parse_args(["--data", "a.json", "--data", "b.json:2", "c.json"]))
    args.pop("pdb", None); args.pop("xtra", None)
    assert settings_kwargs(func, args)["run"].data == ("a.json", "b.json:2", "c.json")
