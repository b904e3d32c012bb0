"""The onnxlrp command line (placeholder until the CLI lands: `onnxlrp explain` is built in issue 3)."""
import sys


def main(argv=None):
    print("onnxlrp: the command line is not built yet; use the Python API (see README.md)", file=sys.stderr)
    return 2
