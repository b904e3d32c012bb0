"""Result files are written whole, next to the target, never through a planted symlink (onnxlrp.files)."""
import os
import stat

import numpy as np
import pytest

from onnxlrp.files import atomic_write, write_bytes
from tests.helpers_fixtures import fixture_path
from tests.test_cli import EXAMPLE, invoke

VICTIM_TEXT = b"root-owned file that must survive"


def _victim(tmp_path):
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    victim.write_bytes(VICTIM_TEXT)
    return victim


def _plant_links(folder, names, victim):
    """Symlinks at every name an earlier onnxlrp would have written through (one per plausible pid)."""
    pid = os.getpid()
    for name in names:
        for p in range(max(1, pid - 50), pid + 50):
            for link in (folder / f"{name}.partial-{p}", folder / f".{name}.partial-{p}"):
                if not os.path.lexists(link):
                    os.symlink(victim, link)


def test_export_never_writes_through_planted_links(tmp_path):
    victim = _victim(tmp_path)
    out_dir = tmp_path / "shared"
    out_dir.mkdir()
    _plant_links(out_dir, ["model_lrp.onnx"], victim)
    result = invoke("export", fixture_path("mlp"), "-o", out_dir / "model_lrp.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == VICTIM_TEXT
    written = out_dir / "model_lrp.onnx"
    assert written.is_file() and not written.is_symlink() and written.stat().st_size > 1000
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".partial")]  # no temporaries left


def test_a_dangling_symlink_at_the_output_counts_as_a_file(tmp_path):
    victim_path = tmp_path / "elsewhere" / "created_through_link"
    victim_path.parent.mkdir()
    out = tmp_path / "model_lrp.onnx"
    os.symlink(victim_path, out)
    result = invoke("export", fixture_path("mlp"), "-o", out, "-q")
    assert result.exit_code == 1 and "exists already (a symlink to nothing)" in result.output + result.stderr
    assert not victim_path.exists()
    result = invoke("export", fixture_path("mlp"), "-o", out, "-q", "--force")
    assert result.exit_code == 0
    assert not victim_path.exists() and out.is_file() and not out.is_symlink()  # the link was replaced


def test_force_replaces_a_link_at_the_output_instead_of_following_it(tmp_path):
    victim = _victim(tmp_path)
    out = tmp_path / "model_lrp.onnx"
    os.symlink(victim, out)
    assert invoke("export", fixture_path("mlp"), "-o", out, "-q", "--force").exit_code == 0
    assert victim.read_bytes() == VICTIM_TEXT and not out.is_symlink()


def test_explain_pictures_never_write_through_planted_links(tmp_path):
    victim = _victim(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    _plant_links(out, ["example_heatmap.png", "example_overlay.png", "example_relevance.npy"], victim)
    os.symlink(victim, out / "example_heatmap.png")  # and at the target itself
    result = invoke("explain", fixture_path("vgg"), EXAMPLE, "--out", out, "--save-npy")
    assert result.exit_code == 1 and "exist already" in result.output + result.stderr
    result = invoke("explain", fixture_path("vgg"), EXAMPLE, "--out", out, "--save-npy", "--force")
    assert result.exit_code == 0, result.stderr
    assert victim.read_bytes() == VICTIM_TEXT
    for name in ("example_heatmap.png", "example_overlay.png", "example_relevance.npy"):
        assert (out / name).is_file() and not (out / name).is_symlink()


def test_a_dangling_symlink_as_out_folder_is_named(tmp_path):
    out = tmp_path / "o"
    os.symlink(tmp_path / "nowhere", out)
    result = invoke("explain", fixture_path("vgg"), EXAMPLE, "--out", out)
    assert result.exit_code == 1 and "is a symlink to nothing" in result.output + result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_atomic_write_leaves_nothing_on_failure_and_keeps_the_usual_permissions(tmp_path):
    target = tmp_path / "a.npy"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    old = os.umask(0o022)
    try:
        with atomic_write(target) as f:
            np.save(f, np.arange(3))
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    np.testing.assert_array_equal(np.load(target), np.arange(3))


def test_write_bytes_is_whole_or_nothing_with_the_usual_permissions_and_no_link_followed(tmp_path, monkeypatch):
    """write_bytes (the pictures' writer): a planted link at the target is replaced, not written through; a
    temporary name that is taken (planted) is skipped; a failed write leaves nothing; the umask applies."""
    victim = _victim(tmp_path)
    target = tmp_path / "a.png"
    os.symlink(victim, target)
    names = iter(["planted", "planted", "fresh"])
    monkeypatch.setattr(os, "urandom", lambda n: next(names).encode())
    os.symlink(victim, tmp_path / f".a.png.{b'planted'.hex()}.partial")
    old = os.umask(0o027)
    try:
        write_bytes(target, b"picture")
    finally:
        os.umask(old)
    monkeypatch.undo()
    assert victim.read_bytes() == VICTIM_TEXT and not target.is_symlink() and target.read_bytes() == b"picture"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    os.unlink(tmp_path / f".a.png.{b'planted'.hex()}.partial")

    def failing_write(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        write_bytes(tmp_path / "b.png", b"x" * 10)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "elsewhere"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_export_into_an_unwritable_folder_fails_before_building(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = invoke("export", fixture_path("mlp"), "-o", folder / "m.onnx")
        assert result.exit_code == 1 and "cannot write in the folder" in result.output + result.stderr
    finally:
        folder.chmod(0o700)
