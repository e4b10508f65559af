"""`llavamed demo --family NAME` at toy size: the same steps and report on a family's tiny preset (stage 0 on
Gemma 3's SigLIP tower, skipped with its reason on a tower it cannot train), stage 1 training the connector
only and the tower frozen bit for bit; a family name the demo does not know, or one the installed packages
cannot run, is one line and exit 2."""
import dataclasses
import json

import pytest
import yaml

from llavamed.cli import main
from llavamed.families import FAMILIES, family_of
from llavamed.pipeline import STEP_NAMES, DemoConfig

TOY_STAGE = {"epochs": 0.5, "global_batch_size": 8, "per_device_batch_size": 8}
TOY = dict(n_train=40, n_test=10, n_chat=3, stage1=TOY_STAGE, stage2=TOY_STAGE, max_new_tokens=4,
           chat_max_new_tokens=8, eval_batch_size=16, threads=1)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    "One toy demo of the tiny Gemma 3 through the CLI."
    d = tmp_path_factory.mktemp("demo_gemma3")
    (d / "toy.yaml").write_text(yaml.safe_dump(TOY))
    assert main(["demo", "--family", "gemma3", "--out", str(d / "out"), "--config", str(d / "toy.yaml"),
                 "--quiet"]) == 0
    return d / "out"


def _by_part(folder) -> dict:
    "The saved model's tensors by family part, read through transformers (the file keeps the hub's key names)."
    from transformers import AutoModelForImageTextToText
    from llavamed.families import parts
    model = AutoModelForImageTextToText.from_pretrained(folder)
    return {part: {k: p.detach().clone() for k, p in ps.items()} for part, ps in parts(model).items()}


def test_gemma3_demo_writes_the_same_report_naming_family_and_model(gemma_dir):
    rep = json.loads((gemma_dir / "report.json").read_text())
    assert (rep["family"], rep["model"], rep["model_class"]) == ("gemma3", "tiny-gemma3",
                                                                 "Gemma3ForConditionalGeneration")
    assert rep["config"]["family"] == "gemma3"
    for k in ("closed_accuracy", "closed_accuracy_blank_image", "strict_closed_accuracy", "open_recall"):
        assert 0 <= rep[k] <= 100, (k, rep[k])
    assert rep["skipped"] == {} and "SigLIP" in rep["tower"]["how"]  # stage 0 drives Gemma 3's SigLIP tower
    assert set(rep["tower"]["train_accuracy_last20pct"]) >= {"present", "side", "domain"}
    assert rep["sizes"]["image_tokens"] == 16 and rep["sizes"]["params"]["projector"] > 0
    md = (gemma_dir / "report.md").read_text()
    assert "Model: `tiny-gemma3` (family `gemma3`, transformers `Gemma3ForConditionalGeneration`)" in md
    assert "Skipped:" not in md and "stage 0 tower pretraining ->" in md
    assert "16 image tokens per figure through the gemma3 processor" in md
    for name in ("loss.png", "metrics.png", "ablation.png", "domains.png", "example_1.png"):
        assert (gemma_dir / "report_files" / name).stat().st_size > 500, name
    for n in STEP_NAMES: assert (gemma_dir / n).is_dir()
    n_test = len(json.loads((gemma_dir / "corpus" / "vqa_test.json").read_text()))
    for abl in ("none", "blank"):
        rows = (gemma_dir / "evaluate" / f"answers_{abl}.jsonl").read_text().splitlines()
        assert len(rows) == n_test


def test_family_without_stage0_skips_it_with_the_reason(tmp_path):
    "Stage 0 does not know Qwen2.5-VL's tower: the model step builds the model and says why stage 0 is skipped."
    from llavamed.pipeline import _family_step, _model_md, _synth_step
    cfg = DemoConfig(family="qwen2_5_vl", n_train=8, n_test=2, n_chat=1)
    corpus = tmp_path / "corpus"
    for name, step in (("corpus", _synth_step(cfg, True)), ("tower", _family_step(cfg, corpus, True))):
        (tmp_path / name).mkdir()
        summary = step(tmp_path / name)
    assert summary["model"] == "tiny-qwen2_5_vl" and "train_accuracy_last20pct" not in summary
    assert summary["skipped"].startswith("stage 0 (tower pretraining on labels.json): it runs on the towers")
    assert "qwen2_5_vl" in summary["skipped"] and not (tmp_path / "tower" / "tower_history.json").exists()
    assert (tmp_path / "tower" / "config.json").exists() and summary["image_tokens"] > 0
    lines = _model_md({"model": "tiny-qwen2_5_vl", "family": "qwen2_5_vl", "model_class": "C",
                       "skipped": {"tower": summary["skipped"]}})
    assert f"Skipped: {summary['skipped']}." in lines


def test_gemma3_stages_train_their_parts_and_keep_the_tower(gemma_dir):
    "Stage 1 changes the connector only; stage 2 the connector and the LM; the tower stays bit-identical."
    assert family_of(json.loads((gemma_dir / "stage2" / "config.json").read_text())).name == "gemma3"
    built, s1, s2 = (_by_part(gemma_dir / d) for d in ("tower", "stage1", "stage2"))
    assert built["tower"] and all(built["tower"][k].equal(s2["tower"][k]) for k in built["tower"])
    assert all(built["tower"][k].equal(s1["tower"][k]) for k in built["tower"])
    assert any(not built["connector"][k].equal(s1["connector"][k]) for k in built["connector"])
    assert all(built["lm"][k].equal(s1["lm"][k]) for k in built["lm"])  # stage 1: the connector only
    assert any(not s1["lm"][k].equal(s2["lm"][k]) for k in s1["lm"])


def test_gemma3_stage2_checkpoint_loads_in_vanilla_transformers(gemma_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(gemma_dir / "stage2")
    proc = AutoProcessor.from_pretrained(gemma_dir / "stage2")
    assert type(model).__name__ == FAMILIES["gemma3"].model_class and type(proc).__name__ == "Gemma3Processor"


def test_unknown_family_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["demo", "--family", "gemma9", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown family 'gemma9'" in err
    assert all(name in err for name in FAMILIES) and not out.exists()


def test_family_the_packages_cannot_run_is_requires_message(tmp_path, capsys, monkeypatch):
    "A family whose processor needs a package that is missing stops before any output, with `require`'s line."
    import llavamed.families as F
    row = dataclasses.replace(F.FAMILIES["smolvlm"], needs=("llavamed_no_such_package",))
    monkeypatch.setitem(F.FAMILIES, "smolvlm", row)
    out = tmp_path / "o"
    assert main(["demo", "--family", "smolvlm", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    missing = "llavamed_no_such_package"
    assert err.splitlines() == [f"llavamed demo: error: family smolvlm: its processor needs {missing}, "
                                f"not installed (pip install {missing})"]
    assert not out.exists()


def test_family_setting_defaults_and_precedence(tmp_path, monkeypatch):
    "llava by default; an alias names its family; `--family` wins over the config file's."
    import llavamed.pipeline as P
    assert DemoConfig().family == "llava" and DemoConfig().preset == "tiny"
    assert DemoConfig(family="idefics3").family == "smolvlm"
    assert DemoConfig(family="gemma3").preset == "tiny-gemma3"
    with pytest.raises(ValueError, match="DemoConfig.family: unknown family 3"): DemoConfig(family=3)
    seen = []
    monkeypatch.setattr(P, "run_pipeline", lambda cfg, out, fresh, quiet: seen.append(cfg.family))
    (tmp_path / "c.yaml").write_text("family: qwen2_5_vl\n")
    P.demo(str(tmp_path / "o"), config=str(tmp_path / "c.yaml"))
    P.demo(str(tmp_path / "o"), config=str(tmp_path / "c.yaml"), family="gemma3")
    P.demo(str(tmp_path / "o"))
    assert seen == ["qwen2_5_vl", "gemma3", "llava"]
