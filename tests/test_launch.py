"The stage launch scripts (`configs/launch_stage*.sh`) across nodes: a real rendezvous on loopback, one rank per node."
import json, os, random, signal, subprocess, sys
from pathlib import Path

import pytest, torch

from llavamed.core import read_jsonl
from llavamed.model import build_model, save_model
from test_train import make_data

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "PATH": f"{BIN}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu"}
ARGS = ["--max-steps", "3", "--global-batch-size", "8", "--per-device-batch-size", "4", "--num-workers", "0",
        "--save-steps", "100", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def stage_env(tmp_path_factory):
    "What launch_stage2.sh needs: a saved tiny model and a small instruction file with images."
    root = tmp_path_factory.mktemp("launch")
    data = make_data(root / "data")
    texts = [t["value"] for r in json.loads(data.read_text()) for t in r["conversations"]]
    torch.manual_seed(0)
    base = save_model(*build_model("tiny", tokenizer_texts=texts), root / "base")
    return {**ENV, "MODEL": str(base), "DATA": str(data), "IMAGES": str(data.parent / "images"), "DS": "zero2"}


def _start(env: dict, out: Path, **more) -> subprocess.Popen:
    "launch_stage2.sh in its own process group (so a timeout can kill its workers too)."
    return subprocess.Popen(["bash", str(ROOT / "configs" / "launch_stage2.sh"), *ARGS],
                            env={**env, "OUT": str(out), **{k: str(v) for k, v in more.items()}},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> None:
    "Wait for every launcher; on a timeout kill them all and fail with their output."
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs: os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("launch timed out: " + " | ".join((p.communicate()[0] or "")[-1500:] for p in procs))
    for p, out in zip(procs, outs): assert p.returncode == 0, out[-3000:]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / "log_history.jsonl")]


def _port() -> int: return 29500 + random.randint(0, 2000)


@pytest.fixture(scope="module")
def one_process(stage_env, tmp_path_factory):
    "The same stage in one process (2 accumulation steps make the global batch of 8)."
    out = tmp_path_factory.mktemp("one") / "run"
    _finish([_start(stage_env, out, LAUNCHER="torchrun", NGPU=1, MASTER_PORT=_port())])
    return _losses(out)


@pytest.mark.slow
def test_two_nodes_torchrun_equal_one_process(stage_env, one_process, tmp_path):
    "Two launchers (node ranks 0 and 1, one process each) meet at MASTER_ADDR:MASTER_PORT and train as one job."
    out, port = tmp_path / "two", _port()
    nodes = [_start(stage_env, out, LAUNCHER="torchrun", NGPU=1, NNODES=2, NODE_RANK=rank, MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port) for rank in (0, 1)]
    _finish(nodes)
    settings = json.loads((out / "stage_config.json").read_text())
    assert (settings["world_size"], settings["gradient_accumulation_steps"]) == (2, 1), settings
    assert len(one_process) == 3 and one_process[0] != one_process[-1]
    assert _losses(out) == pytest.approx(one_process, rel=1e-5), (one_process, _losses(out))


def test_launch_settings_refused_in_one_line(stage_env, tmp_path):
    "Launch variables that cannot work stop before anything starts, with one line naming the variable."
    for more, said in (({"LAUNCHER": "mpirun"}, "LAUNCHER=mpirun: want deepspeed or torchrun"),
                       ({"NNODES": 2}, "NNODES=2 with the deepspeed launcher needs HOSTFILE"),
                       ({"HOSTFILE": tmp_path / "nope"}, "no such file"),
                       ({"LAUNCHER": "torchrun", "HOSTFILE": tmp_path / "h"}, "HOSTFILE is read by the deepspeed")):
        p = _start(stage_env, tmp_path / "out", **more)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 2 and said in out and out.count("\n") == 1, out
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_nodes_deepspeed_hostfile_without_ssh_equal_one_process(stage_env, one_process, tmp_path):
    "The deepspeed launcher with a hostfile, run on every node (NO_SSH=1): the same job as one process."
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only label the nodes: nothing connects to them
    out, port = tmp_path / "two", _port()
    nodes = [_start(stage_env, out, HOSTFILE=hostfile, NO_SSH=1, NODE_RANK=rank, MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port) for rank in (0, 1)]
    _finish(nodes)
    assert json.loads((out / "stage_config.json").read_text())["world_size"] == 2
    assert _losses(out) == pytest.approx(one_process, rel=1e-5), (one_process, _losses(out))
