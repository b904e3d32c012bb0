"""`--help` and `--version` answer without importing onnx or onnxruntime (issue 11, start-up): both are
blocked in a fresh interpreter, so any import of them on that path fails the command. The time itself is
measured by benchmarks/bench_startup.py, not asserted here."""
import subprocess
import sys

import pytest

BLOCK = "import sys\nfor m in ('onnx', 'onnxruntime', 'onnx_graphsurgeon', 'PIL', 'matplotlib'): sys.modules[m] = None\n"


def _run(code):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["explain", "--help"], ["export", "--help"],
                                  ["check", "--help"], ["audit", "--help"], ["rules", "--help"], ["layers", "--help"]])
def test_help_and_version_need_no_heavy_import(argv):
    done = _run(f"from onnxlrp.cli import main\nraise SystemExit(main({argv!r}))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_import_onnxlrp_is_light_and_names_load_on_use():
    done = _run("import onnxlrp\nprint(onnxlrp.__version__, onnxlrp.EpsilonGammaBox(-3, 3).__class__.__name__)\n"
                "try:\n    onnxlrp.LRP\nexcept ImportError:\n    print('LRP needs onnx')")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0.1.0", "Composite", "LRP", "needs", "onnx"]


def test_public_names_resolve():
    import onnxlrp
    for name in onnxlrp.__all__:
        assert getattr(onnxlrp, name) is not None
    assert onnxlrp.rules.ZeroRule is onnxlrp.ZeroRule
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        onnxlrp.nope


def test_function_names_are_not_shadowed_by_submodules():
    """Importing the analyzer imports the canonization module; onnxlrp.canonize stays the function."""
    import onnxlrp
    onnxlrp.LRP
    import onnxlrp.auditing  # noqa: F401  (the module behind onnxlrp.audit)
    assert callable(onnxlrp.canonize) and callable(onnxlrp.heatmap) and callable(onnxlrp.analyze)
    assert callable(onnxlrp.audit)
