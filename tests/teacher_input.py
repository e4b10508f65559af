"Teacher-input fixtures in the official layout (dict keyed by domain), with the synthetic corpus's ground truth."
from __future__ import annotations
import json, random
from pathlib import Path

_DOMAINS = {
    "chest_xray": ("Frontal chest radiograph", ["pleural effusion", "pneumothorax", "consolidation", "nodule"], "chest X-ray"),
    "mri": ("Axial T2-weighted brain MRI", ["hyperintense lesion", "cyst", "edema", "infarct"], "MRI"),
    "histology": ("H&E stained section of the liver", ["granuloma", "necrosis", "fibrosis", "steatosis"], "histology (H&E)"),
    "gross": ("Gross photograph of a resected kidney", ["mass", "cyst", "hemorrhage", "scar"], "gross photograph"),
    "ct_scan": ("Contrast-enhanced axial CT of the abdomen", ["hypodense lesion", "calcification", "abscess", "mass"], "CT"),
}


def teacher_records(n: int, seed: int = 0, facts: bool = True) -> dict:
    "`n` figure records spread over the five domains, keyed by domain; with `facts` unless told otherwise."
    rng, out = random.Random(seed), {d: [] for d in _DOMAINS}
    doms = list(_DOMAINS)
    for i in range(n):
        dom = doms[i % 5]
        what, findings, modality = _DOMAINS[dom]
        finding, side = rng.choice(findings), rng.choice(["left", "right"])
        pid = f"{30000000 + i}_F{1 + i % 3}"
        rec = {"pair_id": pid, "pmid": pid.split("_")[0], "fig_id": pid, "fig_label": f"Figure {1 + i % 3}",
               "fig_caption": f"{what} showing a {side}-sided {finding} (case {i}).",
               "in_text_mention": [{"tokens": f"The {finding} was visible on imaging (Figure {1 + i % 3}).", "entities": []}],
               "domain": dom}
        if facts:
            rec["findings"] = {"finding": finding, "side": side}
            rec["facts"] = [{"question": "What imaging modality is shown?", "answer": modality, "kind": "modality"},
                            {"question": f"Is there a {finding}?", "answer": "yes", "kind": "presence"},
                            {"question": f"On which side is the {finding}?", "answer": side, "kind": "side"}]
        out[dom].append(rec)
    return out


def write_teacher_input(path, n: int, seed: int = 0, facts: bool = True) -> Path:
    "Write `teacher_records(n)` as JSON to `path`; returns the path."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(teacher_records(n, seed, facts), indent=1))
    return path


def pair_ids(path) -> list[str]:
    "All pair ids of a teacher-input file, in file order."
    return [r["pair_id"] for recs in json.loads(Path(path).read_text()).values() for r in recs]
