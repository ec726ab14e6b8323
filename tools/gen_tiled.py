#!/usr/bin/env python3
"""Writes tests/fixtures/tiled/: four 640x480 JPEG frames, each 2 x 2 fixture samples
(320x240 tiles), for config/regions.toml (the README's regions example). The top-left
tile ("gate") is a circle for two frames, then a triangle; the bottom-right ("feeder")
alternates square and triangle.

    pip install pillow && python3 tools/gen_tiled.py
"""
import os

from PIL import Image

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
CLASSES = ["circle", "square", "triangle", "cross", "hstripes", "vstripes", "checker"]


def sample(cls, i):
    d = os.path.join(ROOT, "samples", cls)
    files = sorted(os.listdir(d))
    return Image.open(os.path.join(d, files[i % len(files)])).convert("RGB")


def main():
    out = os.path.join(ROOT, "tiled")
    os.makedirs(out, exist_ok=True)
    for f in range(4):
        pick = [CLASSES[(f // 2) % 2 * 2], CLASSES[3 + f % 3], CLASSES[4 + (f + 1) % 3],
                CLASSES[1 + (f % 2)]]
        frame = Image.new("RGB", (640, 480))
        for k, c in enumerate(pick):
            tile = sample(c, f).resize((320, 240), Image.BILINEAR)
            frame.paste(tile, ((k % 2) * 320, (k // 2) * 240))
        frame.save(os.path.join(out, f"frame{f}.jpg"), quality=90)
        print(f"frame{f}.jpg", pick)


if __name__ == "__main__":
    main()
