"Mechanism tests of llavamed.core: import cost, crash safety of atomic writes, error locations."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
from llavamed.core import RecordError, Sample, atomic_write, read_json, read_jsonl, write_json

def test_import_is_light():
    code = ("import sys, time; t = time.perf_counter(); import llavamed, llavamed.core, llavamed.cli; "
            "dt = time.perf_counter() - t; heavy = [m for m in ('torch', 'deepspeed', 'openai', 'transformers', "
            "'pydicom', 'nibabel', 'peft', 'ipywidgets') if m in sys.modules]; print(dt, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    dt, heavy = float(out[0]), out[1].strip()
    assert heavy == "[]", f"import llavamed pulled in {heavy}"
    assert dt < 1.0, f"import took {dt:.2f}s"

def test_killed_writer_leaves_old_file(tmp_path):
    target = tmp_path / "records.json"
    write_json(target, {"version": "old"})
    ready = tmp_path / "ready"
    # The child starts rewriting the file with a large payload, signals, then stalls mid-write.
    child = textwrap.dedent(f"""
        import time
        from llavamed.core import atomic_write
        with atomic_write({str(target)!r}) as f:
            f.write('{{"version": "new", "pad": "' + 'x' * 5_000_000)
            f.flush()
            open({str(ready)!r}, 'w').close()
            time.sleep(60)
            f.write('"}}')
    """)
    p = subprocess.Popen([sys.executable, "-c", child])
    try:
        for _ in range(200):
            if ready.exists(): break
            time.sleep(0.05)
        assert ready.exists(), "writer never started"
        temps = [q for q in tmp_path.iterdir() if q.name.startswith(".records.json.")]
        assert temps and temps[0].stat().st_size >= 5_000_000  # the new content is really on disk, beside the target
    finally:
        p.send_signal(signal.SIGKILL); p.wait()
    assert read_json(target) == {"version": "old"}

def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"id": 1}\n\n{"id": 2}\n{"id": 3,,}\n{"id": 4}\n')
    with pytest.raises(RecordError) as e: list(read_jsonl(f))
    assert e.value.line == 4 and e.value.path == str(f)
    assert f"{f}:4: malformed JSON" in str(e.value)
    got = list(read_jsonl(f, skip_bad=True))
    assert [r["id"] for r in got if isinstance(r, dict)] == [1, 2, 4]

def test_malformed_json_names_line(tmp_path):
    f = tmp_path / "data.json"
    f.write_text('[\n {"id": 1},\n {"id": 2\n]\n')
    with pytest.raises(RecordError, match=r"data.json:4"): read_json(f)

def test_sample_round_trip_keeps_unknown_keys():
    rec = {"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"},
           {"from": "gpt", "value": "A"}], "domain": {"mri": True}, "answer_type": "OPEN", "custom": [1, 2]}
    assert Sample.from_json(json.loads(json.dumps(rec))).to_json() == rec
