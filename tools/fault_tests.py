#!/usr/bin/env python3
"""Fault tests against a built daemon and a real Mosquitto (issue 12): the outbox on a
small tmpfs that fills up during a broker outage.

    sudo tools/fault_tests.py [BINARY]      (default target/release/edgesight)

Root is needed to mount the tmpfs. What is checked, with the figures printed:

1. Outage, disk fills: the daemon does not crash, keeps new events in memory (counted:
   memory-only; those still waiting when the disk has room again are written then:
   written late), and once the broker is back every accepted event arrives at a
   subscriber (persistent session, QoS 1), in order per detection.
2. A restart while the disk is still full: the new run opens the full directory, replays
   every record on it, and delivers them. What the first run held in memory only is
   lost with it, and was counted (memory-only minus written late).
3. The disk fills, then has room again while the broker is still away: the records held
   in memory are written (written late), and a restart then loses nothing.

Delivery is observed by a subscriber on the same Mosquitto, with persistence on and a
clean stop (SIGTERM) for every broker outage, so the broker loses nothing here: any
missing event is ours.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "fault"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout=90):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.2)
    raise SystemExit(f"FAIL: timed out waiting for {what}")


class Mosquitto:
    def __init__(self, work, port):
        self.conf = os.path.join(work, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"
                    f"persistence true\npersistence_location {work}/\n")
        self.port, self.proc = port, None

    def start(self):
        self.proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("mosquitto", lambda: socket.socket().connect_ex(("127.0.0.1", self.port)) == 0)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)  # saves its sessions and their queues
        self.proc.wait()


class Daemon:
    running = []

    def __init__(self, binary, config, log):
        self.log_path = log
        self.proc = subprocess.Popen([binary, "run", "--config", config],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        Daemon.running.append(self.proc)

    def log(self):
        return open(self.log_path, errors="replace").read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        assert rc == 0, f"exit {rc}: {self.log()[-2000:]}"
        m = re.search(r"outbox: accepted (\d+) delivered (\d+) waiting (\d+) dropped (\d+) "
                      r"quarantined (\d+) skipped (\d+) memory-only (\d+) written late (\d+)",
                      self.log())
        assert m, self.log()[-2000:]
        keys = "accepted delivered waiting dropped quarantined skipped memory_only written_late"
        return dict(zip(keys.split(), map(int, m.groups())))


def received(path):
    """(id, type) of every detection the subscriber got, in arrival order."""
    out = []
    for line in open(path, errors="replace"):
        topic, _, payload = line.partition(" ")
        if topic.endswith("/detection"):
            v = json.loads(payload)
            out.append((v["id"], v["type"]))
    return out


def on_disk(outbox):
    """(id, type) of the records in the outbox directory. The record layout is
    src/mqtt/outbox/store.rs's: magic 4, crc 4, seq 8, topic length 2, payload length 4
    (little-endian), topic, payload."""
    out = set()
    for name in os.listdir(outbox):
        if name.endswith(".rec"):
            data = open(os.path.join(outbox, name), "rb").read()
            tlen = int.from_bytes(data[16:18], "little")
            v = json.loads(data[22 + tlen:])
            out.add((v["id"], v["type"]))
    return out


def fill_disk(d):
    """`d`, once the disk has refused a record (and a moment more)."""
    wait_for("the disk to refuse a record", lambda: "kept in memory" in d.log())
    time.sleep(2)
    return d


def replay(d, kept, broker, msgs, before):
    """A restarted daemon `d` replays `kept` (what was on disk) once the broker is back:
    (kept, d's counters)."""
    wait_for("the restart to replay", lambda: "from a previous run" in d.log())
    broker.start()
    wait_for("the replayed records", lambda: kept <= set(received(msgs)[before:]), 120)
    time.sleep(2)
    counters = d.stop()
    time.sleep(1)  # the broker forwards the last ones
    return kept, counters


def in_order(got):
    first, seen, state = [], set(), {}
    for e in got:
        if e not in seen:
            seen.add(e)
            first.append(e)
    for i, kind in first:
        prev = state.get(i)
        ok = prev is None if kind == "start" else prev in ("start", "update")
        assert ok, f"{i}: {kind} after {prev}"
        state[i] = kind


def main():
    binary = os.path.realpath(sys.argv[1] if len(sys.argv) > 1
                              else os.path.join(ROOT, "target/release/edgesight"))
    if os.geteuid() != 0:
        os.execvp("sudo", ["sudo", sys.executable, *sys.argv])
    work = tempfile.mkdtemp(prefix="edgesight-fault-")
    outbox = os.path.join(work, "outbox")
    os.makedirs(outbox)
    # 24 pages: a few record files, then ENOSPC.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k,nr_inodes=64", "edgesight-fault",
                    outbox], check=True)
    port = free_port()
    broker = Mosquitto(work, port)
    sub = None
    try:
        config = os.path.join(work, "edgesight.toml")
        with open(config, "w") as f:
            f.write(f"""[device]\nid = "{DEVICE}"\n[log]\nlevel = "info"\n
[mqtt]\nhost = "127.0.0.1"\nport = {port}\nqos = 1\nreconnect_min_ms = 50\nreconnect_max_ms = 300\n
[model]\npath = "{ROOT}/tests/fixtures/models/shapes_int8_qlinear.onnx"
labels = "{ROOT}/tests/fixtures/labels.txt"\n
[outbox]\ndir = "{outbox}"\nfsync = "always"\n
[detection]\nmin_frames = 2\nend_frames = 2\n
[[camera]]\nname = "front"\npath = "{ROOT}/tests/fixtures/samples"\nfps = 20\nloop = true\n""")
        # The subscriber's persistent session exists before the outage.
        broker.start()
        msgs = os.path.join(work, "messages.txt")
        sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-i", "fault-sub", "-c",
                                "-q", "1", "-v", "-t", f"edgesight/{DEVICE}/+/detection"],
                               stdout=open(msgs, "w"), stderr=subprocess.DEVNULL)
        time.sleep(1)
        broker.stop()

        # 1. Outage; the disk fills; the broker comes back.
        d = Daemon(binary, config, os.path.join(work, "run1.log"))
        wait_for("the disk to refuse a record", lambda: "kept in memory" in d.log())
        time.sleep(3)
        broker.start()
        wait_for("the outbox to drain", lambda: not any(
            n.endswith(".rec") for n in os.listdir(outbox)), 120)
        time.sleep(2)
        c1 = d.stop()
        time.sleep(1)  # the broker forwards the last ones
        got = received(msgs)
        unique = set(got)
        print(f"1. full disk during an outage: accepted {c1['accepted']}, memory-only "
              f"{c1['memory_only']}, written late {c1['written_late']}, delivered "
              f"{c1['delivered']}; subscriber got {len(unique)} distinct events "
              f"({len(got) - len(unique)} duplicates)")
        assert c1["memory_only"] > 0, "the disk never filled"
        assert c1["waiting"] == 0 and c1["delivered"] == c1["accepted"], c1
        assert len(unique) == c1["accepted"], f"{len(unique)} != {c1['accepted']}"
        in_order(got)

        # 2. Outage again; the disk fills; restart while it is still full.
        broker.stop()
        before = len(got)
        c2 = fill_disk(Daemon(binary, config, os.path.join(work, "run2.log"))).stop()
        kept, c3 = replay(Daemon(binary, config, os.path.join(work, "run3.log")),
                          on_disk(outbox), broker, msgs, before)
        got2 = received(msgs)[before:]
        lost = c2["accepted"] - c2["delivered"] - len(kept)
        print(f"2. restart with the disk full: run 2 accepted {c2['accepted']} (memory-only "
              f"{c2['memory_only']}, written late {c2['written_late']}), {len(kept)} on disk "
              f"at the restart, all {len(kept)} delivered by run 3; lost with run 2's memory: "
              f"{lost} (counted: memory-only {c2['memory_only']} - written late "
              f"{c2['written_late']} = {c2['memory_only'] - c2['written_late']}); run 3 "
              f"accepted {c3['accepted']} more, delivered {c3['delivered']}")
        assert "cannot write there now" in open(os.path.join(work, "run3.log")).read()
        assert lost == c2["memory_only"] - c2["written_late"], (lost, c2)
        assert c3["waiting"] == 0, c3
        in_order(got2)

        # 3. Outage again; the disk fills, then has room again (remounted larger) while
        #    the broker is still away: what was held in memory is written, and a restart
        #    loses nothing.
        broker.stop()
        before = len(received(msgs))
        d = fill_disk(Daemon(binary, config, os.path.join(work, "run4.log")))
        subprocess.run(["mount", "-o", "remount,size=4m", outbox], check=True)
        wait_for("the memory-only records on disk", lambda: "takes records again" in d.log())
        c4 = d.stop()
        kept, _ = replay(Daemon(binary, config, os.path.join(work, "run5.log")),
                         on_disk(outbox), broker, msgs, before)
        print(f"3. the disk has room again: run 4 accepted {c4['accepted']}, memory-only "
              f"{c4['memory_only']}, written late {c4['written_late']}; {len(kept)} on disk "
              f"at the restart, all delivered by run 5; lost: "
              f"{c4['accepted'] - len(kept)}")
        assert c4["memory_only"] > 0 and c4["written_late"] > 0, c4
        assert len(kept) == c4["accepted"], (len(kept), c4)
        print("PASS: fault tests")
    except BaseException:
        for log in sorted(os.listdir(work)):
            if log.endswith(".log"):
                print(f"--- {log} (tail)")
                print(open(os.path.join(work, log), errors="replace").read()[-3000:])
        print("--- outbox:", sorted(os.listdir(outbox))[:20])
        raise
    finally:
        for p in Daemon.running:
            if p.poll() is None:
                p.kill()
                p.wait()
        if sub:
            sub.kill()
        if broker.proc and broker.proc.poll() is None:
            broker.proc.kill()
        subprocess.run(["umount", outbox], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
