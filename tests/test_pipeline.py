"""`llavamed demo` at toy size: every step runs through the real modules, every artefact is written, and
a rerun reuses finished steps (a removed marker or a changed setting reruns that step and the steps built
on it; --fresh reruns all)."""
import json
from pathlib import Path

import pytest
import yaml

from llavamed.cli import main
import dataclasses
from llavamed.pipeline import STEP_INPUTS, STEP_KEYS, STEP_NAMES, DemoConfig, Steps, run_pipeline

TOY_STAGE = {"epochs": 0.5, "global_batch_size": 8, "per_device_batch_size": 8}
TOY = dict(n_train=40, n_test=10, n_chat=3, tower_steps=4, stage1=TOY_STAGE, stage2=TOY_STAGE,
           max_new_tokens=4, chat_max_new_tokens=8, eval_batch_size=16, threads=1)
KEYS = ("closed_accuracy", "open_recall", "closed_accuracy_blank_image", "strict_closed_accuracy", "train_seconds",
        "total_seconds", "seeds", "sizes", "config", "tower", "per_domain", "chat_groups")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    "One toy demo run through the CLI, as `make demo` starts it."
    d = tmp_path_factory.mktemp("demo")
    cfg = d / "toy.yaml"
    cfg.write_text(yaml.safe_dump(TOY))
    assert main(["demo", "--out", str(d / "out"), "--config", str(cfg), "--seed", "1", "--quiet"]) == 0
    return d / "out"


def _markers(root: Path) -> dict:
    return {n: json.loads((root / "steps" / f"{n}.json").read_text()) for n in STEP_NAMES}


def test_every_artefact_and_report_key(demo_dir):
    rep = json.loads((demo_dir / "report.json").read_text())
    for k in KEYS: assert k in rep, k
    for k in ("closed_accuracy", "closed_accuracy_blank_image", "strict_closed_accuracy", "open_recall"):
        assert 0 <= rep[k] <= 100, (k, rep[k])
    assert rep["seeds"]["corpus"] == 1 and rep["config"]["n_train"] == 40
    assert rep["sizes"]["train_figures"] == 40 and rep["sizes"]["test_figures"] == 10
    assert rep["train_seconds"] > 0 and rep["total_seconds"] >= rep["train_seconds"]
    assert "labels.json" in rep["tower"]["how"] and "frozen" in rep["tower"]["how"]
    assert (rep["family"], rep["model"], rep["skipped"], rep["sizes"]["image_tokens"]) == ("llava", "tiny", {}, 16)
    md = (demo_dir / "report.md").read_text()
    assert "Model: `tiny` (family `llava`, transformers `LlavaForConditionalGeneration`)" in md
    assert "Skipped:" not in md and "stage 0 tower pretraining ->" in md
    for name in ("loss.png", "metrics.png", "ablation.png", "domains.png", "example_1.png", "example_2.png", "example_3.png"):
        f = demo_dir / "report_files" / name
        assert f.stat().st_size > 500, name
        assert f"report_files/{name}" in md, name
    assert "strict mode" in md and "blank image" in md and "PROXY" in md
    for n in STEP_NAMES: assert (demo_dir / n).is_dir() and not (demo_dir / f".{n}.tmp").exists()
    for stage in ("stage1", "stage2"):
        rows = [json.loads(l) for l in (demo_dir / stage / "log_history.jsonl").read_text().splitlines()]
        assert rows and {"step", "loss"} <= set(rows[0])
        assert (demo_dir / stage / "config.json").exists()


def test_answer_files_are_official_format_and_cover_the_test_split(demo_dir):
    n_test = len(json.loads((demo_dir / "corpus" / "vqa_test.json").read_text()))
    for abl in ("none", "blank"):
        rows = [json.loads(l) for l in (demo_dir / "evaluate" / f"answers_{abl}.jsonl").read_text().splitlines()]
        assert len(rows) == n_test
        assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(rows[0])
    scores = json.loads((demo_dir / "evaluate" / "scores_none.json").read_text())
    assert scores["official"]["n_closed"] + scores["official"]["n_open"] == n_test


def test_tower_frozen_through_stages_1_and_2(demo_dir):
    from safetensors.torch import load_file
    w0, w2 = (load_file(str(demo_dir / d / "model.safetensors")) for d in ("tower", "stage2"))
    vis = [k for k in w0 if "vision_tower" in k]
    assert vis and all(w0[k].equal(w2[k]) for k in vis)
    assert any(not w0[k].equal(w2[k]) for k in w0 if "multi_modal_projector" in k)


def test_rerun_reuses_steps_and_reruns_only_what_a_change_touches(demo_dir, capsys):
    cfg = DemoConfig(**{**TOY, "seed": 1})
    before = _markers(demo_dir)
    rep = run_pipeline(cfg, demo_dir)
    assert rep.report["steps_run_now"] == [] and _markers(demo_dir) == before
    assert "reused" in capsys.readouterr().err  # progress lines go to stderr: stdout is for the result
    (demo_dir / "steps" / "evaluate.json").unlink()
    rep = run_pipeline(cfg, demo_dir, quiet=True)
    assert rep.report["steps_run_now"] == ["evaluate"]  # judging does not read the evaluation
    after = _markers(demo_dir)
    assert after["stage2"] == before["stage2"] and after["judge"] == before["judge"]
    # a stage-2 setting: stage 2 and what reads its model rerun; data, tower and stage 1 are reused
    rep = run_pipeline(dataclasses.replace(cfg, stage2={**cfg.stage2, "lr": cfg.stage2["lr"] / 2}), demo_dir, quiet=True)
    assert rep.report["steps_run_now"] == ["stage2", "evaluate", "judge"]
    now = _markers(demo_dir)
    assert all(now[n] == after[n] for n in ("corpus", "instruct", "tower", "stage1"))
    assert now["stage2"]["inputs"] == {"stage1": after["stage1"]["run_id"], "instruct": after["instruct"]["run_id"]}


def test_every_setting_belongs_to_a_step_and_inputs_come_first():
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    assert set().union(*STEP_KEYS.values()) == fields and set(STEP_KEYS) == set(STEP_INPUTS) == set(STEP_NAMES)
    assert all(STEP_NAMES.index(a) < STEP_NAMES.index(n) for n in STEP_NAMES for a in STEP_INPUTS[n])


def test_failed_step_leaves_no_marker_and_no_output(tmp_path):
    s = Steps(tmp_path, {"a": 1}, quiet=True)
    def fails(d):
        (d / "partial.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError): s.run("stage1", fails)
    assert not (tmp_path / "stage1").exists() and not s.marker("stage1").exists()
    assert Steps(tmp_path, {"a": 1}, quiet=True).done("stage1") is None


def test_config_errors_name_the_field(tmp_path, capsys):
    with pytest.raises(ValueError, match="DemoConfig.eval_batch_size"): DemoConfig(eval_batch_size=0)
    with pytest.raises(ValueError, match="DemoConfig.stage2: StageConfig.global_batch_size"):
        DemoConfig(stage2={"global_batch_size": 0})
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_trian: 10\n")
    assert main(["demo", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2  # an expected error: one line
    assert "unknown DemoConfig fields ['n_trian']" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_demo_help_lists_options(capsys):
    with pytest.raises(SystemExit): main(["demo", "--help"])
    out = capsys.readouterr().out
    for opt in ("--out", "--fresh", "--seed", "--config"): assert opt in out


def test_stage_settings_are_the_paper_presets_with_the_demo_fields():
    cfg = DemoConfig(stage2={"lr": 5e-4})
    assert cfg.stage2 == {"lr": 5e-4, "epochs": 2.0, "global_batch_size": 16, "per_device_batch_size": 16}
    s1, s2 = cfg.stage("stage1"), cfg.stage("stage2")
    assert (s1.name, s1.train, s1.template, s1.lr, s1.epochs) == ("align", ("projector",), "plain", 2e-3, 1.0)
    assert (s2.name, s2.train, s2.lr, s2.epochs, s2.seed) == ("instruct", ("projector", "llm"), 5e-4, 2.0, 0)
    assert DemoConfig(**cfg.to_json()) == cfg  # a report's settings rebuild the same config


def test_demo_seed_from_the_config_unless_given(tmp_path, monkeypatch):
    "`--seed` wins over a config file's seed; without it the file's seed (else 0) is used."
    import llavamed.pipeline as P
    seen = []
    monkeypatch.setattr(P, "run_pipeline", lambda cfg, out, fresh, quiet: seen.append(cfg.seed))
    (tmp_path / "c.yaml").write_text("seed: 3\n")
    P.demo(str(tmp_path / "o"), config=str(tmp_path / "c.yaml"))
    P.demo(str(tmp_path / "o"), config=str(tmp_path / "c.yaml"), seed=5)
    P.demo(str(tmp_path / "o"))
    assert seen == [3, 5, 0]


@pytest.mark.parametrize("text, words", [('[{"id": "x", "conv', "not a JSON or YAML file"), ("[1, 2]", "expected a mapping"),
                                         (None, "no such file")])
def test_a_bad_config_file_is_one_line_and_nothing_is_written(tmp_path, capsys, text, words):
    from llavamed.cli import main
    cfg = tmp_path / "cfg.json"
    if text is not None: cfg.write_text(text)
    assert main(["demo", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
