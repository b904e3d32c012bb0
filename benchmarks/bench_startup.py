"""Start-up: the command line, and an analyzer's construction in a fresh process.

Without ``--models``: `onnxlrp --version` and `onnxlrp explain --help` against `python -c pass`, each the
median of a few fresh processes, printed as seconds and as a ratio (issue 11: well under a second; they
need neither onnx nor onnxruntime, which are imported only when a command reads a model).

With ``--models A.onnx B.onnx``: ``onnxlrp.LRP(path, EpsilonGammaBox(-3, 3))`` in fresh processes, from
``import onnxlrp`` to a ready analyzer (issue 12: VGG16 <= 3 s, ResNet50 <= 1 s), three ways: the cache off
(``cache=False``), a cache miss (an empty cache folder: the key's hash and the entry's writing included) and
a cache hit (the entry the miss wrote). Each is the median of ``--runs`` processes (the miss and the hit
take a new folder per run), with its construction phases and the process's peak RSS.

    python benchmarks/bench_startup.py [--runs 7]
    python benchmarks/bench_startup.py --models benchmarks/.cache/vgg16.onnx benchmarks/.cache/resnet50.onnx --runs 3
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "onnxlrp --version": [sys.executable, "-m", "onnxlrp", "--version"],
    "onnxlrp --help": [sys.executable, "-m", "onnxlrp", "--help"],
    "onnxlrp explain --help": [sys.executable, "-m", "onnxlrp", "explain", "--help"],
    "import onnxlrp; onnxlrp.LRP": [sys.executable, "-c", "import onnxlrp; onnxlrp.LRP"],
}

# one construction in this fresh process: seconds from before `import onnxlrp`, phases, status, peak RSS
CONSTRUCT = """
import json, resource, sys, time
start = time.perf_counter()
import onnxlrp
cache = json.loads(sys.argv[2])
analyzer = onnxlrp.LRP(sys.argv[1], onnxlrp.EpsilonGammaBox(-3, 3), verbose=False, device="cpu", cache=cache)
seconds = time.perf_counter() - start
for pending in analyzer._cache_writes:  # the entry a hit reads; not part of the construction
    pending.wait()
print(json.dumps({"s": seconds, "phases": analyzer.construction_times, "status": analyzer.cache_status,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def median_seconds(cmd, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def construct(model, cache):
    out = subprocess.run([sys.executable, "-c", CONSTRUCT, model, json.dumps(cache)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def median_run(results):
    """The run with the median time (its phases and peak as they were measured together)."""
    return sorted(results, key=lambda r: r["s"])[len(results) // 2]


def bench_models(models, runs):
    print(f"{'model':<14} {'way':<6} {'median s':>9} {'peak MiB':>9}  phases (s) of the median run")
    for model in models:
        rows = {"off": [], "miss": [], "hit": []}
        for _ in range(runs):
            rows["off"].append(construct(model, False))
            folder = tempfile.mkdtemp(prefix="onnxlrp_startup_")
            try:
                rows["miss"].append(construct(model, folder))
                rows["hit"].append(construct(model, folder))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        for way, results in rows.items():
            statuses = {r["status"] for r in results}
            if statuses != {way}:  # the ways are named as the analyzer's cache_status
                raise SystemExit(f"{model}: the {way} runs reported cache status {sorted(statuses)}")
            best = median_run(results)
            phases = ", ".join(f"{k} {v:.2f}" for k, v in best["phases"].items())
            name = model.rsplit("/", 1)[-1]
            print(f"{name:<14} {way:<6} {best['s']:>9.2f} {best['peak_mib']:>9.0f}  {phases}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--models", nargs="+", help="time the construction of these .onnx files instead")
    args = parser.parse_args()
    if args.models:
        bench_models(args.models, args.runs)
        return
    base = None
    print(f"{'command':<32} {'median s':>9} {'x python -c pass':>17}")
    for name, cmd in COMMANDS.items():
        t = median_seconds(cmd, args.runs)
        base = base or t
        print(f"{name:<32} {t:>9.3f} {t / base:>16.1f}x", flush=True)


if __name__ == "__main__":
    main()
