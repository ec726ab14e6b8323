#!/usr/bin/env python3
"""ARM speed without a board: edgesight's inference time on a Raspberry Pi 4 and 5,
estimated from what runs (counted exactly under qemu-user) times what each piece costs
(llvm-mca's scheduling model of the core).

Method, per board, model and thread count:

1. **Count.** `edgesight bench` runs under qemu-user (`-cpu` the board's core, so the
   program takes the paths it takes there: `sdot` kernels on a Pi 5, `smull` on a Pi 4)
   with the tbcount plugin (tools/armmodel/tbcount.c), which counts every translated
   block's executions per guest thread and keeps its machine code. Two runs, of one and
   of two inferences, are subtracted: loading, optimising and the first inference
   cancel, leaving exactly one steady-state inference.
2. **Price.** The hottest blocks (99.8 % of executed instructions) are disassembled
   (llvm-mc) and each is given to llvm-mca as a code region. A loop body (a block
   whose last instruction branches back to its first) costs total cycles / iterations
   of the block repeated back to back, its carried dependencies included; any other
   block costs llvm-mca's block reciprocal throughput, because repeating straight-line
   code back to back chains each made-up execution to the next through the registers
   it reads and writes (an epilogue that requantises accumulators in place was priced
   at 23 cycles instead of 8), where the core overlaps it with the code around it.
   Colder blocks get the hot blocks' mean cycles per instruction.
3. **Sum.** Cycles per thread = sum of executions x cycles; the estimate for a thread
   count is the busiest thread's cycles (threads are assumed to overlap perfectly and
   never to wait on memory) at the board's clock (the Pis' nominal clocks; this
   machine's measured by a chain of dependent multiplies).
4. **Calibrate.** The same method on this x86 machine (qemu-x86_64 -cpu max, whose
   widest vectors are AVX2, and LLVM's model of this core), against the same build run
   natively with `TRACT_CPU_ISA` taking AVX-512, VNNI and AMX away so that it runs the
   same code qemu ran, priced with LLVM's model of this host's core (`llc --version`'s
   "Host CPU": sapphirerapids or znver4). The ratio is the method's error here.

Scheduling models (LLVM 19): the Pi 4's Cortex-A72 is priced with `-mcpu=cortex-a72`,
which LLVM maps to its Cortex-A57 model (the A72's predecessor: same pipeline layout);
the Pi 5's Cortex-A76 with `-mcpu=neoverse-n1`, the A76's server sibling, because LLVM's
`cortex-a76` is also the A57 model.

  tools/arm_model.py setup                       # plugin + llvm, once (root)
  tools/arm_model.py estimate --board pi5 --model target/bench-models/r50_qdq_pc.onnx --threads 1
  tools/arm_model.py table                       # every board, model and thread count
  tools/arm_model.py calibrate --model target/bench-models/r50_fp32.onnx

Needs: qemu-user (the dynamic build: qemu-user-static takes no plugins), llvm-19,
gcc, glib's headers, an aarch64 release build (cross/build.sh build aarch64) and an x86
release build (cargo build --release). Counts are cached in target/armmodel/.
"""

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "target" / "armmodel"
PLUGIN = WORK / "tbcount.so"
LLVM = "19"
# Inferences in the two counted runs (no warm-up), subtracted.
RUNS = (1, 2)
HOT_SHARE = 0.998
MCA_ITERATIONS = 100
# AVX-512, VNNI and AMX taken from tract and from edgesight's own dispatch: what is left
# is what qemu-x86_64 -cpu max (7.2) has.
X86_AS_QEMU = "-avx512f,-avx512vnni,-avx512fp16,-amx-int8,-amx-bf16,-avxvnni"


@dataclasses.dataclass(frozen=True)
class Board:
    name: str
    arch: str  # qemu's and llvm's
    qemu_cpu: str
    mcpu: str
    mattr: str
    ghz: float
    binary: Path


AARCH64_BIN = ROOT / "target/cross/aarch64-unknown-linux-gnu/release/edgesight"
BOARDS = {
    "pi4": Board("Raspberry Pi 4 (Cortex-A72, 1.8 GHz)", "aarch64", "cortex-a72",
                 "cortex-a72", "", 1.8, AARCH64_BIN),
    "pi5": Board("Raspberry Pi 5 (Cortex-A76, 2.4 GHz)", "aarch64", "cortex-a76",
                 "neoverse-n1", "+dotprod", 2.4, AARCH64_BIN),
}


CLOCK_PROBE = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b;
    long n = 100000000, x = 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        __asm__ volatile("imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0"
                         : "+r"(x) : "r"(i | 1));
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
    printf("%f %ld\n", n * 4 * 3 / s / 1e9, x);
    return 0;
}
"""


def measured_ghz():
    """This core's clock under load, from a chain of dependent `imul`s (3 cycles each on
    every x86 core since Nehalem). /proc/cpuinfo gives the nominal clock (2.6 GHz here)
    while the core runs near 3.9: pricing cycles at the nominal clock would be off by
    half again."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "clock"
        subprocess.run(["gcc", "-O2", "-x", "c", "-o", exe, "-"], input=CLOCK_PROBE,
                       text=True, check=True)
        return max(float(subprocess.run(["taskset", "-c", "0", exe], capture_output=True,
                                        text=True, check=True).stdout.split()[0])
                   for _ in range(3))


def host_mcpu():
    """LLVM's name for this machine's core (its scheduling model prices the calibration):
    sapphirerapids on the project's Xeons, znver4 on its Zen 4s."""
    out = subprocess.run([f"llc-{LLVM}", "--version"], capture_output=True, text=True,
                         check=True).stdout
    return re.search(r"Host CPU: (\S+)", out).group(1)


def x86_board():
    ghz, mcpu = measured_ghz(), host_mcpu()
    return Board(f"this machine (x86-64 {mcpu}, {ghz:.2f} GHz measured)", "x86_64", "max",
                 mcpu, "", ghz, ROOT / "target/release/edgesight")


# ---------------------------------------------------------------- setup
def setup(_args):
    """qemu-user, llvm-19 and the plugin, built against the installed qemu's header."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-user",
                    f"llvm-{LLVM}", "gcc", "libglib2.0-dev", "pkg-config", "dpkg-dev",
                    "xz-utils"], check=True, env=env)
    WORK.mkdir(parents=True, exist_ok=True)
    header = WORK / "qemu-plugin.h"
    if not header.exists():
        fetch_header(header)
    cflags = subprocess.run(["pkg-config", "--cflags", "glib-2.0"], check=True,
                            capture_output=True, text=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", f"-I{WORK}", *cflags, "-o",
                    str(PLUGIN), str(ROOT / "tools/armmodel/tbcount.c")], check=True)
    print(f"built {PLUGIN}")


def fetch_header(dest):
    """include/qemu/qemu-plugin.h of the installed qemu, from Debian's source package (the
    plugin API must be the running qemu's)."""
    src = Path("/etc/apt/sources.list.d/edgesight-src.sources")
    if not src.exists():
        src.write_text("Types: deb-src\nURIs: http://deb.debian.org/debian\n"
                       "Suites: bookworm bookworm-updates\nComponents: main\n"
                       "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
                       "Types: deb-src\nURIs: http://deb.debian.org/debian-security\n"
                       "Suites: bookworm-security\nComponents: main\n"
                       "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        subprocess.run(["apt-get", "update", "-q"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "source", "--download-only", "qemu"], cwd=tmp, check=True)
        orig = next(Path(tmp).glob("qemu_*.orig.tar.xz"))
        subprocess.run(["tar", "xJf", orig, "--wildcards", "*/include/qemu/qemu-plugin.h"],
                       cwd=tmp, check=True)
        shutil.copy(next(Path(tmp).glob("*/include/qemu/qemu-plugin.h")), dest)


# ---------------------------------------------------------------- count
def counted_cmd(board, model, threads, kernel, runs, out):
    qemu = f"qemu-{board.arch}"
    # One thread: QEMU's own inline counters (faster; not per thread).
    mode = ",inline=on" if threads == 1 else ""
    cmd = [qemu, "-cpu", board.qemu_cpu, "-plugin", f"{PLUGIN},out={out}{mode}"]
    if board.arch == "aarch64":
        cmd += ["-L", "/usr/aarch64-linux-gnu"]
    return cmd + [str(board.binary), "bench", "--model", str(model), "--threads", str(threads),
                  "--runs", str(runs), "--warmup", "0", "--int8-kernel", kernel]


def run_counted(cmds):
    """Both runs at once (they are independent); their `bench` reports."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    reports = []
    for c, p in zip(cmds, procs):
        out, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"{' '.join(c)} failed:\n{err[-2000:]}")
        reports.append(json.loads(out))
    return reports


def parse_counts(path):
    """{(vaddr, insns, code): {vcpu: count}}"""
    blocks = {}
    for line in Path(path).read_text().splitlines():
        vaddr, insns, code, counts = line.split(" ")
        blocks[(vaddr, int(insns), code)] = {int(v): int(c) for v, c in
                                             (p.split(":") for p in counts.split(","))}
    return blocks


def count(board, model, threads, kernel="best"):
    """Executions per block and thread for one steady-state inference (cached)."""
    key = hashlib.sha256(f"{board.binary.stat().st_mtime_ns} {board.qemu_cpu} {model} "
                         f"{Path(model).stat().st_size} {threads} {kernel}".encode()).hexdigest()
    cache = WORK / f"counts-{key[:16]}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    WORK.mkdir(parents=True, exist_ok=True)
    outs = [WORK / f"tb-{key[:16]}-{runs}.txt" for runs in RUNS]
    bench = run_counted([counted_cmd(board, model, threads, kernel, runs, out)
                         for runs, out in zip(RUNS, outs)])[-1]
    lo, hi = (parse_counts(out) for out in outs)
    for out in outs:
        out.unlink()
    per = RUNS[1] - RUNS[0]
    blocks = []
    for k, counts in hi.items():
        # Threads are numbered in creation order in both runs; a thread's executions in
        # the short run are subtracted from the same thread's in the long one.
        base = lo.get(k, {})
        diff = {v: (c - base.get(v, 0)) / per for v, c in counts.items()}
        diff = {v: c for v, c in diff.items() if c > 0}
        if diff:
            blocks.append({"vaddr": k[0], "insns": k[1], "code": k[2], "counts": diff})
    result = {"board": board.qemu_cpu, "model": str(model), "threads": threads,
              "kernel": bench.get("int8_kernel"), "blocks": blocks}
    cache.write_text(json.dumps(result))
    return result


# ---------------------------------------------------------------- price
def disassemble(board, codes):
    """Assembly text of each block (hex machine code), `llvm-mc --disassemble`: a batch
    in one call, split by instruction counts; one call per block if a batch does not
    decode to exactly its blocks' instructions."""
    triple = "aarch64" if board.arch == "aarch64" else "x86_64"
    cmd = [f"llvm-mc-{LLVM}", "--disassemble", f"-triple={triple}"]
    if board.arch == "aarch64":
        # Every extension qemu may have run: the disassembler must know each encoding.
        cmd.append("-mattr=+dotprod,+fullfp16,+crc,+lse,+rcpc,+aes,+sha2")

    def run(hexes):
        data = "\n".join(" ".join(f"0x{h[i:i + 2]}" for i in range(0, len(h), 2))
                         for h in hexes)
        res = subprocess.run(cmd, input=data, capture_output=True, text=True)
        return [ln.strip() for ln in res.stdout.splitlines()
                if ln.strip() and not ln.strip().startswith(".")]

    def batch(items):
        lines = run([code for code, _ in items])
        if len(lines) != sum(n for _, n in items):
            return [run([code]) for code, _ in items]
        out, at = [], 0
        for _, n in items:
            out.append(lines[at:at + n])
            at += n
        return out

    batches = [codes[i:i + 200] for i in range(0, len(codes), 200)]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return [a for b in pool.map(batch, batches) for a in b]


def mca(board, regions):
    """Per region (name -> instructions), one llvm-mca run: (cycles per execution run back
    to back, llvm-mca's block reciprocal throughput)."""
    text = []
    for name, insns in regions.items():
        text.append(f"# LLVM-MCA-BEGIN {name}")
        text.extend(insns)
        text.append("# LLVM-MCA-END")
    cmd = [f"llvm-mca-{LLVM}", f"-mtriple={board.arch}", f"-mcpu={board.mcpu}",
           f"-iterations={MCA_ITERATIONS}", "-skip-unsupported-instructions=any",
           "-instruction-info=false", "-resource-pressure=false"]
    if board.mattr:
        cmd.append(f"-mattr={board.mattr}")
    res = subprocess.run(cmd, input="\n".join(text) + "\n", capture_output=True, text=True)
    cycles = {}
    for m in re.finditer(r"Code Region - (\S+)\s+Iterations:\s+(\d+)\s+Instructions:\s+\d+\s+"
                         r"Total Cycles:\s+(\d+)(?:.|\n)*?Block RThroughput:\s+([\d.]+)",
                         res.stdout):
        cycles[m.group(1)] = (int(m.group(3)) / int(m.group(2)), float(m.group(4)))
    return cycles, res.stderr


def self_loop(board, asm, code):
    """Whether a block ends in a branch back to its own first instruction: a loop body,
    whose dependencies from one execution to the next are real. (aarch64 branches count
    from the branch, 4 bytes before the end; x86's from the end.)"""
    if not asm:
        return False
    m = re.match(r"(b\.\w+|b|cbn?z|tbn?z|j\w+)\s.*?#?(-\d+)$", asm[-1])
    if not m:
        return False
    size = len(code) // 2
    return int(m.group(2)) == (-(size - 4) if board.arch == "aarch64" else -size)


def rep_string(asm):
    return len(asm) == 1 and asm[0].startswith("rep")


def price(board, counted):
    blocks = counted["blocks"]
    for b in blocks:
        b["total"] = sum(b["counts"].values())
    blocks.sort(key=lambda b: -b["total"] * b["insns"])
    dyn = sum(b["total"] * b["insns"] for b in blocks)
    hot, acc = [], 0.0
    for b in blocks:
        if acc >= HOT_SHARE * dyn:
            break
        hot.append(b)
        acc += b["total"] * b["insns"]
    asm = disassemble(board, [(b["code"], b["insns"]) for b in hot])
    regions = {f"b{i}": a for i, a in enumerate(asm) if a and not rep_string(a)}
    both, errors = mca(board, regions)
    # A loop body is priced run back to back, its carried dependencies included. Other
    # blocks are not run back to back: the registers a block reads and also writes (an
    # epilogue that requantises accumulators in place) would chain one made-up
    # execution to the next. They get llvm-mca's throughput bound, as the out-of-order
    # core overlaps them with the code around them.
    cycles = {}
    for i, b in enumerate(hot):
        if f"b{i}" in both:
            back_to_back, throughput = both[f"b{i}"]
            loop = self_loop(board, asm[i], b["code"])
            cycles[f"b{i}"] = back_to_back if loop else throughput
    for i, a in enumerate(asm):
        if rep_string(a):
            # qemu runs `rep movs/stos` one element per block execution: fast strings
            # move ~32 bytes a cycle (x86 only; ARM copies are ordinary loops).
            cycles[f"b{i}"] = 1 / 32
    priced = [(b, cycles.get(f"b{i}")) for i, b in enumerate(hot)]
    known = [(b, c) for b, c in priced if c is not None]
    cpi = sum(c * b["total"] for b, c in known) / max(1, sum(b["insns"] * b["total"]
                                                             for b, c in known))
    threads = {}
    index = {id(b): i for i, b in enumerate(hot)}
    for b in blocks:
        c = cycles.get(f"b{index[id(b)]}") if id(b) in index else None
        c = c if c is not None else cpi * b["insns"]
        b["cycles"] = c
        for v, n in b["counts"].items():
            threads[v] = threads.get(v, 0.0) + n * c
    top = sorted(blocks, key=lambda b: -b["total"] * b["cycles"])[:8]
    return {
        "threads": threads,
        "busiest_ms": max(threads.values()) / (board.ghz * 1e6),
        "all_ms": sum(threads.values()) / (board.ghz * 1e6),
        "instructions": dyn,
        "hot_blocks": len(hot),
        "unpriced": len(hot) - len(known),
        "cpi": cpi,
        "top": [{"share": round(b["total"] * b["cycles"] / sum(threads.values()), 3),
                 "cycles": round(b["cycles"], 2), "runs": b["total"],
                 "first": (asm[index[id(b)]] if id(b) in index else ["?"])[:3]} for b in top],
        "mca_errors": errors.strip().splitlines()[:3],
    }


def estimate(board, model, threads, kernel="best"):
    counted = count(board, model, threads, kernel)
    out = price(board, counted)
    out["kernel"] = counted["kernel"]
    return out


# ---------------------------------------------------------------- commands
def cmd_estimate(args):
    board = x86_board() if args.board == "x86" else BOARDS[args.board]
    e = estimate(board, args.model, args.threads, args.kernel)
    print(json.dumps(e, indent=1))


def native_ms(board, model, threads, runs=15):
    env = dict(os.environ, TRACT_CPU_ISA=X86_AS_QEMU)
    cores = ",".join(str(i) for i in range(threads))
    res = subprocess.run(["taskset", "-c", cores, str(board.binary), "bench", "--model",
                          str(model), "--threads", str(threads), "--runs", str(runs),
                          "--warmup", "2"], env=env, capture_output=True, text=True, check=True)
    d = json.loads(res.stdout)
    return d["median_ms"], d.get("int8_kernel")


def cmd_calibrate(args):
    board = x86_board()
    print(f"{board.name}, LLVM model -mcpu={board.mcpu}\n")
    print(f"| model | threads | estimated ms | measured ms | estimate / measured | "
          f"kernel |\n|---|---|---|---|---|---|")
    for model in args.model:
        for threads in args.threads:
            e = estimate(board, model, threads)
            ms, kernel = native_ms(board, model, threads)
            print(f"| {Path(model).stem} | {threads} | {e['busiest_ms']:.1f} | {ms:.1f} | "
                  f"{e['busiest_ms'] / ms:.2f} | {kernel} |", flush=True)


def cmd_table(args):
    print("| board | model | threads | kernel | estimated ms | all threads' ms | "
          "instructions | cycles / instruction |\n|---|---|---|---|---|---|---|---|")
    for name in args.boards:
        board = BOARDS[name]
        for model in args.model:
            for threads in args.threads:
                e = estimate(board, model, threads)
                print(f"| {name} | {Path(model).stem} | {threads} | {e['kernel']} | "
                      f"{e['busiest_ms']:.1f} | {e['all_ms']:.1f} | "
                      f"{e['instructions'] / 1e9:.2f} G | {e['cpi']:.2f} |", flush=True)
                if args.verbose:
                    print(json.dumps(e["top"], indent=1), file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup").set_defaults(func=setup)
    p = sub.add_parser("estimate")
    p.add_argument("--board", choices=[*BOARDS, "x86"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernel", default="best")
    p.set_defaults(func=cmd_estimate)
    models = [str(ROOT / f"target/bench-models/{m}.onnx") for m in
              ("r18_qdq_pc", "r50_qdq_pc", "r18_fp32", "r50_fp32")]
    p = sub.add_parser("table")
    p.add_argument("--boards", nargs="+", default=list(BOARDS))
    p.add_argument("--model", nargs="+", default=models)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 4])
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_table)
    p = sub.add_parser("calibrate")
    p.add_argument("--model", nargs="+", default=models)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.set_defaults(func=cmd_calibrate)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
