"""The README's Python examples run as written (in order, in one namespace)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 4
    os.symlink(os.path.join(ROOT, "models_fixtures"), tmp_path / "models_fixtures")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        try:
            exec(compile(block, "README.md", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message shows which block broke
            pytest.fail(f"README block failed: {type(exc).__name__}: {exc}\n---\n{block}")
    assert namespace["expl"].val.shape == namespace["x"].shape


def test_readme_transformer_commands_run(tmp_path, monkeypatch):
    """The README's command lines on the transformer fixtures run as written."""
    import shlex

    from click.testing import CliRunner

    from onnxlrp.cli.app import cli
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
                    for line in block.splitlines() if line.startswith("onnxlrp explain models_fixtures/transformers")]
    assert len(commands) >= 3
    os.symlink(os.path.join(ROOT, "models_fixtures"), tmp_path / "models_fixtures")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        result = CliRunner().invoke(cli, shlex.split(command)[1:], prog_name="onnxlrp")
        assert result.exit_code == 0, f"{command}\n{result.output}"
