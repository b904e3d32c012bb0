"""Start-up of the command line: `onnxlrp --version` and `onnxlrp explain --help` against `python -c pass`,
each the median of a few fresh processes, printed as seconds and as a ratio (issue 11: well under a second;
they need neither onnx nor onnxruntime, which are imported only when a command reads a model).

    python benchmarks/bench_startup.py [--runs 7]
"""
import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "onnxlrp --version": [sys.executable, "-m", "onnxlrp", "--version"],
    "onnxlrp --help": [sys.executable, "-m", "onnxlrp", "--help"],
    "onnxlrp explain --help": [sys.executable, "-m", "onnxlrp", "explain", "--help"],
    "import onnxlrp; onnxlrp.LRP": [sys.executable, "-c", "import onnxlrp; onnxlrp.LRP"],
}


def median_seconds(cmd, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    base = None
    print(f"{'command':<32} {'median s':>9} {'x python -c pass':>17}")
    for name, cmd in COMMANDS.items():
        t = median_seconds(cmd, args.runs)
        base = base or t
        print(f"{name:<32} {t:>9.3f} {t / base:>16.1f}x", flush=True)


if __name__ == "__main__":
    main()
