"The `llavamed` console command: discovery, errors and exit codes as a shell user sees them."
import subprocess
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

def test_main_returns_status():
    assert main(["--version"]) == 0 and main([]) == 2
