"""The suite runs with onnxlrp's on-disk cache on, in a folder of its own: a test that builds an analyzer a
second time (the same fixture and composite) then checks a cache hit against its independent reference."""
import os
import shutil
import tempfile

import pytest

if "ONNXLRP_CACHE_DIR" not in os.environ:  # subprocesses (the CLI tests) inherit it
    os.environ["ONNXLRP_CACHE_DIR"] = tempfile.mkdtemp(prefix="onnxlrp-test-cache-")
    os.environ.setdefault("ONNXLRP_CACHE_MAX_BYTES", "4G")
    _OWN_CACHE = os.environ["ONNXLRP_CACHE_DIR"]
else:
    _OWN_CACHE = None


@pytest.fixture(scope="session", autouse=True)
def _remove_test_cache():
    yield
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
