#!/usr/bin/env python3
"""Fine-tune a classifier on the hard examples the daemon kept, after a person sorted them.

The other half of `hard_examples = true` (README, "Hard examples"): the daemon keeps the
frames (or region crops) its model was unsure about, or flipped on, under
<device.state_dir>/hard-examples/, a JPEG and a JSON sidecar each. Sort the JPEGs into one
folder per class, named as the model's labels (`sorted/circle/*.jpg`, ...; files left
outside a class folder are ignored), then:

    pip install -r tools/requirements.txt
    python3 tools/finetune.py sorted/ --model model_fp32.onnx --labels labels.txt -o new.onnx

It holds out a share of each class (seeded), measures the model it came from on it
(onnxruntime), converts that model to PyTorch (onnx2torch: any ONNX ResNet, the fixture
model, or another classifier of the operators onnx2torch knows), fine-tunes it on the
rest, exports the result as ONNX, quantises it with tools/quantize.py (its int8 form, the
one to deploy: `new_int8.onnx`), and measures both on the held-out examples again:

    held-out accuracy (N images): before 41.2 %, after 93.5 % (fp32), 93.1 % (int8)

Start from the model's float export (the int8 file cannot be trained). The labels stay
the model's; a class folder that is not one of them is refused.

    python3 tools/finetune.py --make-demo DIR

writes a sorted demo set into DIR: the fixture model's classes drawn as outlines, a look
it was never trained on (what a camera in a new place brings), to try the loop on.
"""
import argparse
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize  # noqa: E402  (tools/quantize.py: image_files, input_geometry, tensor)


def load(examples, labels):
    """(path, class index) for every image in a class folder of `examples`."""
    items = []
    for d in sorted(p for p in Path(examples).iterdir() if p.is_dir()):
        if d.name not in labels:
            sys.exit(f"{d}: {d.name!r} is not a label of the model (labels: {', '.join(labels)})")
        files = [p for p in sorted(d.iterdir()) if p.suffix.lower() in quantize.EXTS]
        items += [(p, labels.index(d.name)) for p in files]
    if not items:
        sys.exit(f"{examples}: no class folders with images (sort the examples into <label>/ folders)")
    return items


def split(items, share, seed):
    """Per class, `share` of the images held out (at least one where a class has two)."""
    rng = random.Random(seed)
    train, held = [], []
    for c in sorted({c for _, c in items}):
        mine = [it for it in items if it[1] == c]
        rng.shuffle(mine)
        k = max(1, round(len(mine) * share)) if len(mine) > 1 else 0
        held += mine[:k]
        train += mine[k:]
    return train, held


def accuracy(model_path, items, geometry, preprocess):
    name, layout, h, w = geometry
    s = quantize.session(model_path)
    right = 0
    for p, c in items:
        out = s.run(None, {name: quantize.tensor(p, layout, h, w, preprocess)})[0]
        right += int(np.argmax(out.reshape(-1)) == c)
    return 100.0 * right / max(1, len(items))


def fine_tune(model_path, train, geometry, preprocess, epochs, seed):
    import torch
    from onnx2torch import convert

    torch.manual_seed(seed)
    _, layout, h, w = geometry
    net = convert(str(model_path))
    x = torch.from_numpy(np.concatenate([quantize.tensor(p, layout, h, w, preprocess) for p, _ in train]))
    y = torch.tensor([c for _, c in train])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=1e-4)
    flip = 3 if layout == "nchw" else 2  # the width axis
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            xb = x[idx]
            # Mirror images: the classes here do not care, and it doubles what is seen.
            mask = torch.rand(len(xb)) < 0.5
            xb[mask] = xb[mask].flip(flip)
            loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(x):.3f}")
    net.eval()
    return net, x[:1]


def export(net, sample, out):
    import torch

    torch.onnx.export(net, (sample,), str(out), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)


def outline_demo(out, per_class=40, seed=7):
    """The fixture's classes as outlines (shapes) and thin lines (patterns)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    classes = ["circle", "square", "triangle", "cross", "hstripes", "vstripes", "checker"]
    for cls in classes:
        d = Path(out) / cls
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            s = 128
            bg = tuple(int(v) for v in rng.integers(0, 256, 3))
            fg = tuple(255 - v for v in bg)
            img = Image.new("RGB", (s, s), bg)
            g = ImageDraw.Draw(img)
            r = rng.uniform(0.2, 0.38) * s
            cx, cy = rng.uniform(r, s - r, 2)
            lw = int(rng.integers(2, 5))
            if cls == "circle":
                g.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=lw)
            elif cls in ("square", "triangle"):
                n = 4 if cls == "square" else 3
                a = rng.uniform(0, 2 * np.pi)
                pts = [(cx + r * np.cos(a + 2 * np.pi * i / n), cy + r * np.sin(a + 2 * np.pi * i / n)) for i in range(n)]
                g.polygon(pts, outline=fg, width=lw)
            elif cls == "cross":
                g.line([cx - r, cy, cx + r, cy], fill=fg, width=lw)
                g.line([cx, cy - r, cx, cy + r], fill=fg, width=lw)
            else:
                period = rng.uniform(10, 20)
                for t in np.arange(rng.uniform(0, period), s, period):
                    if cls in ("hstripes", "checker"):
                        g.line([0, t, s, t], fill=fg, width=lw)
                    if cls in ("vstripes", "checker"):
                        g.line([t, 0, t, s], fill=fg, width=lw)
            img.save(d / f"{k:03d}.jpg", quality=90)
    print(f"{out}: {per_class} images per class, {len(classes)} classes")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("examples", nargs="?", help="folder of class folders (sorted hard examples)")
    ap.add_argument("--model", type=Path, help="the float ONNX model the examples came from")
    ap.add_argument("--labels", type=Path, help="its labels file, one per line")
    ap.add_argument("-o", "--output", type=Path, help="the fine-tuned model (its int8 form beside it)")
    ap.add_argument("--preprocess", choices=["torchvision", "caffe", "raw"], default="torchvision")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--holdout", type=float, default=0.3, help="share of each class held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--make-demo", metavar="DIR", help="write a sorted demo set and exit")
    a = ap.parse_args()
    if a.make_demo:
        return outline_demo(a.make_demo)
    if not (a.examples and a.model and a.labels and a.output):
        ap.error("EXAMPLES, --model, --labels and -o are required")
    labels = [l.strip() for l in a.labels.read_text().splitlines() if l.strip()]
    geometry = quantize.input_geometry(a.model)
    items = load(a.examples, labels)
    train, held = split(items, a.holdout, a.seed)
    print(f"{len(items)} examples in {len({c for _, c in items})} classes: {len(train)} to train on, {len(held)} held out")
    before = accuracy(a.model, held, geometry, a.preprocess)
    print(f"before: {before:.1f} % of the held-out examples right ({a.model})")
    net, sample = fine_tune(a.model, train, geometry, a.preprocess, a.epochs, a.seed)
    export(net, sample, a.output)
    after = accuracy(a.output, held, geometry, a.preprocess)
    int8 = a.output.with_name(a.output.stem + "_int8.onnx")
    calib = Path(a.output).with_suffix(".calib")
    calib.mkdir(exist_ok=True)
    for p, c in train:
        (calib / f"{c}_{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    subprocess.run([sys.executable, str(Path(__file__).with_name("quantize.py")), str(a.output),
                    "--calib", str(calib), "--preprocess", a.preprocess, "-o", str(int8)],
                   check=True, stdout=subprocess.DEVNULL)
    after8 = accuracy(int8, held, geometry, a.preprocess)
    print(f"held-out accuracy ({len(held)} images): before {before:.1f} %, "
          f"after {after:.1f} % (fp32, {a.output}), {after8:.1f} % (int8, {int8})")


if __name__ == "__main__":
    main()
