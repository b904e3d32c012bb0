"""Paths and comparisons for the committed fixture models."""
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models_fixtures")
FIXTURES = ["mlp", "vgg", "resnet", "mobilenet"]


def fixture_path(name):
    return os.path.join(ROOT, name + ".onnx")


def load_reference(name):
    return dict(np.load(os.path.join(ROOT, name + "_ref.npz"), allow_pickle=False))


def relative_l2(got, want):
    """Per-sample ||got - want|| / ||want||."""
    got = np.asarray(got, dtype=np.float64).reshape(len(want), -1)
    want = np.asarray(want, dtype=np.float64).reshape(len(want), -1)
    return np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
