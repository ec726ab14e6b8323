"""Checks for tests/vm/run.sh: what the host received over MQTT from edgesight in the VM
(`mosquitto_sub -v` lines: topic, space, payload) and what the VM's console printed."""

import json
import re
import sys

msgs = [line.rstrip("\n").split(" ", 1) for line in open(sys.argv[1], errors="replace") if " " in line]
console = open(sys.argv[2], errors="replace").read()
base = "edgesight/qemu-pi"
failed = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failed.append(what)


def payloads(topic):
    return [p for t, p in msgs if t == topic]


check(
    "/dev/video0: vivid (platform:vivid-000)" in console
    and "/dev/video1: skipped: /dev/video1 (vivid) cannot capture video" in console,
    "edgesight cameras: vivid's capture nodes, output/metadata nodes skipped",
)


def modes_listed(node):
    """The mode lines `edgesight cameras` printed under `node` (before the run starts)."""
    text = console.split("edgesight-vm: starting edgesight")[0].replace("\r", "")
    block = re.search(re.escape(node) + r": vivid \(platform:vivid-\d+\)\n((?:    .*\n)+)", text)
    return [line.strip() for line in block.group(1).splitlines()] if block else []


modes = modes_listed("/dev/video0")
want = ["YUYV 320x180 @ 5 fps", "NV12 320x180 @ 5 fps", "GREY 320x180 @ 5 fps",
        "RGB3 320x180 @ 5 fps", "BGR3 320x180 @ 5 fps", "YUYV 1280x720 @ 1 fps"]
check(all(m in modes for m in want),
      f"edgesight cameras: /dev/video0's {len(modes)} modes include {want}")
check(all(modes_listed(f"/dev/video{n}") for n in range(4, 10)),
      "edgesight cameras: every other vivid capture node lists its modes")


def timeline(cam):
    """The camera's status messages in the order the daemon published them (by `ts`),
    each once: a subscriber that reconnects is sent the retained one again, and one that
    connects mid-start-up may get it ahead of older ones still in flight."""
    seen = {}
    for p in payloads(f"{base}/{cam}/status"):
        s = json.loads(p)
        seen[(s["ts"], s["state"])] = s
    return [seen[k] for k in sorted(seen)]


# Each camera asked for a format (and size); mode negotiation must deliver it.
expect = {
    "yuyv": "YUYV 320x180",
    "nv12": "NV12 320x180",
    "gray": "GREY 320x180",  # nokhwa 0.10 asked for "GRAY"; fixed in vendor/
    "rgb": "RGB3 320x180",
    "bgr": "BGR3 320x180",
    "auto": "YUYV 1280x720",  # asked 1000x600, auto: the closest size, YUYV first
}
for cam, mode in expect.items():
    n = len(payloads(f"{base}/{cam}/classification"))
    status = [json.loads(p) for p in payloads(f"{base}/{cam}/status")]
    modes = sorted({s.get("mode") for s in status} - {None})
    check(n > 0, f"{cam}: {n} classification(s)")
    check(any(m.startswith(mode) for m in modes), f"{cam}: streamed in {mode} (status: {modes})")
    line = timeline(cam)
    seq = ["online" if s["online"] else "offline" for s in line]
    collapsed = [a for i, a in enumerate(seq) if i == 0 or seq[i - 1] != a]
    up = collapsed.index("online") if "online" in collapsed else len(collapsed)
    since_up = collapsed[up:]
    check(since_up[:3] == ["online", "offline", "online"], f"{cam}: unplug, replug: {collapsed}")
    # nv12 stalls once more (its driver drops everything for 40 s) and comes back; the
    # others, rgb with its flagged buffers included, stay online until the shutdown.
    after = ["offline", "online", "offline"] if cam == "nv12" else ["offline"]
    check(since_up[3:] == after, f"{cam}: then {after}: {since_up[3:]}")
    avail = payloads(f"{base}/{cam}/availability")
    check("online" in avail and avail[-1:] == ["offline"], f"{cam}: availability ends offline")
    # The replug: the first streaming status after a waiting one.
    replug = next((b["ts"] for a, b in zip(line, line[1:])
                   if a["state"] == "waiting" and b["state"] == "streaming"), None)
    classified = [json.loads(p)["ts"] for p in payloads(f"{base}/{cam}/classification")]
    after = sum(1 for ts in classified if replug and ts > replug)
    check(after > 0, f"{cam}: {after} classification(s) after the replug at {replug}")
    reasons = [s.get("reason") for s in status if s["state"] == "waiting"]
    unplugged = [r for r in reasons if isinstance(r, str) and f"/dev/v4l/by-id/vivid-" in r
                 and "(camera unplugged?)" in r]
    check(bool(reasons) and all(isinstance(r, str) and r for r in reasons) and bool(unplugged),
          f"{cam}: offline with a reason, naming the device: {unplugged[:1]}")

# vivid's default pattern, 75% colour bars, left to right; GREY shows their luma, which
# vivid computes with Rec. 709's weights (its colorspace at these sizes).
BARS = [(191, 191, 191), (191, 191, 0), (0, 191, 191), (0, 191, 0),
        (191, 0, 191), (191, 0, 0), (0, 0, 191), (0, 0, 0)]
GREY = [round(0.2126 * r + 0.7152 * g + 0.0722 * b) for r, g, b in BARS]
bars = {}
for line in open(sys.argv[3]) if len(sys.argv) > 3 else []:
    cam, *v = line.split()
    bars[cam] = [tuple(int(x) for x in v[i:i + 3]) for i in range(0, len(v), 3)]
for cam in expect:
    got = bars.get(cam, [])
    want = [(y, y, y) for y in GREY] if cam == "gray" else BARS
    worst = max((abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)), default=None)
    check(len(got) == 8 and worst <= 24,
          f"{cam}: the snapshot shows vivid's colour bars (worst channel off by {worst}): {got}")

moved = re.search(r"vivid-5 was (/dev/video\d+), now (/dev/video\d+)", console)
check(bool(moved) and moved.group(1) != moved.group(2),
      f"auto: replugged under a new node, found through its by-id link: "
      f"{moved.groups() if moved else None}")

mjpeg = [json.loads(p).get("reason") or "" for p in payloads(f"{base}/mjpeg/status")]
why = [r for r in mjpeg if 'no mode in format "mjpeg" (it offers:' in r]
check(
    not payloads(f"{base}/mjpeg/classification") and bool(why),
    f"mjpeg (vivid has none): offline, saying why: {why[:1]}",
)

out = [json.loads(p).get("reason") or "" for p in payloads(f"{base}/output/status")]
why = [r for r in out if "/dev/video1 (vivid) cannot capture video" in r]
check(
    not payloads(f"{base}/output/classification") and bool(why),
    f"output (a node that cannot capture): offline, saying why: {why[:1]}",
)

# The drops: the reader stuck in the driver is not joined by more of them.
threads = [int(n) for n in re.findall(r"threads while nv12 drops everything: (\d+)", console)]
before = re.findall(r"threads before the drops: (\d+)", console)
check(
    len(threads) == 2 and bool(before) and threads[1] <= threads[0] + 1
    and threads[1] <= int(before[0]) + 3,
    f"threads bounded while nv12 delivers nothing: before {before}, during {threads}",
)
nv12 = [json.loads(p) for p in payloads(f"{base}/nv12/status")]
check(
    any("stalled" in (s.get("reason") or "") for s in nv12[3:]),
    "nv12: the drops are reported as a stall",
)
# The flagged buffers: counted as bad frames.
stats = [json.loads(p) for p in payloads(f"{base}/stats")]
bad = [s["cameras"]["rgb"]["bad_frames"] for s in stats if "rgb" in s.get("cameras", {})]
check(
    console.count("v4l2-ctl: /dev/v4l/by-id/vivid-3") >= 1 and bool(bad) and bad[-1] >= 1,
    f"rgb: buffers flagged V4L2_BUF_FLAG_ERROR counted as bad frames: {bad[-1:]}",
)

dev = payloads(f"{base}/availability")
check(dev[:1] == ["online"] and dev[-1:] == ["offline"], f"device availability: {dev}")
check("edgesight exited with 0" in console, "edgesight exited 0 after SIGTERM")
for t, p in msgs:
    if t.endswith("/classification"):
        print("   e.g. " + t + " " + p[:170])
        break
sys.exit(1 if failed else 0)
