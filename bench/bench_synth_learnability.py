"""Is the synthetic corpus learnable by a tiny model at 64 px? A quick signal check, not a unit test.

Renders figures of both splits at 64 px, trains a small convolutional classifier (three strided convs,
then a linear layer over the flattened 8x8 map so position survives) on every `LABEL_HEADS` head for
a fixed time budget, and prints test accuracy per head beside the majority-class rate. Presence and
side are the heads the demo's yes/no questions lean on most.

With `--vqa`, it then writes a real corpus (`make_corpus` at that size, JPEG files read back), freezes the
trained tower and trains a small question-conditioned answerer (bag-of-words question embedding + image
features -> yes/no) on the CLOSED questions of `vqa_train.json`, and reports CLOSED accuracy on
`vqa_test.json` with the real images and with a blank image: a cheap stand-in for the demo's
">= 85% closed, blank image <= 60%" targets.

    nice .venv/bin/python bench/bench_synth_learnability.py [--seconds 30] [--n-train 3000] [--n-test 500] [--arch cnn|vit] [--vqa]
"""
import argparse, time
import numpy as np

def TinyViT(size: int, patch: int = 8, dim: int = 128, layers: int = 3):
    "A CLIP-like tower in miniature: patch embedding + learned positions + pre-norm encoder, mean-pooled."
    import torch, torch.nn as nn
    class _V(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, patch)
            self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
        def forward(self, x):  # x: (B, 3, size, size)
            t = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, patches, dim)
            return self.norm(self.enc(t)).mean(1)  # (B, dim)
    return _V()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30, help="training time budget")
    ap.add_argument("--steps", type=int, default=0, help="train the tower this many steps instead of for --seconds")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vqa", action="store_true", help="also train and score a question-conditioned yes/no answerer")
    ap.add_argument("--arch", choices=("cnn", "vit"), default="cnn",
                    help="cnn: strided convs + flatten; vit: 3-layer ViT, 8 px patches, mean-pooled patch features (the demo tower's shape)")
    a = ap.parse_args()
    import torch, torch.nn as nn, torch.nn.functional as F
    from llavamed.synth import LABEL_HEADS, labels_of, render_figure, sample_findings
    torch.manual_seed(a.seed); torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    data = {}
    for split, n in (("train", a.n_train), ("test", a.n_test)):
        figs = sample_findings(n, a.seed, split)
        x = np.stack([render_figure(f, a.size, f["seed"]) for f in figs])  # (n, size, size, 3) uint8
        y = {h: torch.tensor([labels_of(f)[h] for f in figs]) for h in LABEL_HEADS}
        data[split] = (torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).sub(0.5), y)  # (n, 3, size, size)
    print(f"rendered {a.n_train} + {a.n_test} figures at {a.size} px in {time.perf_counter() - t0:.1f} s")
    s = a.size // 8
    if a.arch == "cnn":
        body = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.ReLU(), nn.Conv2d(24, 32, 3, 2, 1), nn.ReLU(),
                             nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * s * s, 128), nn.ReLU())
    else: body = TinyViT(a.size, dim=128)
    heads = nn.ModuleDict({h: nn.Linear(128, len(c)) for h, c in LABEL_HEADS.items()})
    opt = torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=2e-3 if a.arch == "cnn" else 5e-4)
    xtr, ytr = data["train"]
    t0, step = time.perf_counter(), 0
    while (step < a.steps) if a.steps else (time.perf_counter() - t0 < a.seconds):
        idx = torch.randint(0, len(xtr), (64,))
        z = body(xtr[idx])
        loss = sum(F.cross_entropy(heads[h](z), ytr[h][idx]) for h in heads)
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
        if step % 200 == 0: print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t0:5.1f} s")
    xte, yte = data["test"]
    with torch.no_grad(): z = body(xte)
    print(f"\ntrained {step} steps (batch 64) in {time.perf_counter() - t0:.1f} s; test accuracy per head:")
    for h in heads:
        acc = (heads[h](z).argmax(-1) == yte[h]).float().mean().item()
        major = torch.bincount(yte[h]).max().item() / len(yte[h])
        pres = yte["present"] == 1  # side/region/size/finding among abnormal figures only: the hard part
        sub = (heads[h](z)[pres].argmax(-1) == yte[h][pres]).float().mean().item()
        print(f"  {h:8s} {100 * acc:5.1f}%  (majority class {100 * major:5.1f}%; on abnormal figures {100 * sub:5.1f}%)")

    if a.vqa: vqa_check(a, body)

def vqa_check(a, body):
    "Frozen tower + bag-of-words question -> yes/no on the corpus's CLOSED questions; real vs blank image."
    import re, tempfile, torch, torch.nn as nn, torch.nn.functional as F
    from pathlib import Path
    from PIL import Image
    from llavamed.core import iter_samples
    from llavamed.synth import make_corpus
    with tempfile.TemporaryDirectory() as tmp:
        make_corpus(tmp, n_train=a.n_train, n_test=a.n_test, seed=a.seed, size=a.size, quiet=True)
        load = lambda name: [s for s in iter_samples(Path(tmp) / name) if s.answer_type == "CLOSED"]
        tr, te = load("vqa_train.json"), load("vqa_test.json")
        names = sorted({s.image for s in tr + te})
        pix = {n: torch.from_numpy(np.array(Image.open(Path(tmp) / "images" / n).convert("RGB"))) for n in names}
    words = lambda q: re.findall(r"[a-z]+", q.lower())
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for s in tr for w in words(s.question)}))}
    def encode(samples, blank=False):
        x = torch.stack([pix[s.image] for s in samples]).permute(0, 3, 1, 2).float().div(255).sub(0.5)
        if blank: x = torch.zeros_like(x)  # a uniform mid-grey image
        with torch.no_grad(): f = torch.cat([body(x[i:i + 256]) for i in range(0, len(x), 256)])
        ids = [[vocab.get(w, 0) for w in words(s.question)] for s in samples]
        L = max(map(len, ids)); q = torch.tensor([r + [0] * (L - len(r)) for r in ids])
        y = torch.tensor([s.answer == "yes" for s in samples]).long()
        return f, q, y
    emb = nn.EmbeddingBag(len(vocab) + 1, 64, mode="mean", padding_idx=0)
    head = nn.Sequential(nn.Linear(64 + 128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    # the interaction between question and image needs a product term: a tiny stand-in for cross-attention
    gate = nn.Linear(64, 128)
    fwd = lambda f, q: head(torch.cat([emb(q), f * gate(emb(q))], -1))
    opt = torch.optim.AdamW([*emb.parameters(), *head.parameters(), *gate.parameters()], lr=2e-3)
    ftr, qtr, ytr = encode(tr)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < a.seconds:
        idx = torch.randint(0, len(ytr), (128,))
        loss = F.cross_entropy(fwd(ftr[idx], qtr[idx]), ytr[idx])
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
    print(f"\nquestion-conditioned answerer: {len(tr)} CLOSED training questions, {step} steps in {time.perf_counter() - t0:.1f} s")
    for blank in (False, True):
        f, q, y = encode(te, blank)
        with torch.no_grad(): acc = (fwd(f, q).argmax(-1) == y).float().mean().item()
        print(f"  CLOSED accuracy on {len(te)} test questions, {'blank image' if blank else 'real image '}: {100 * acc:5.1f}%"
              f"  (yes share {100 * y.float().mean().item():.1f}%)")

if __name__ == "__main__": main()
