"""Import helper for zennit in environments with a broken/missing torchvision.

zennit (0.5.x) imports ``torchvision`` at import time, but only in
``zennit/torchvision.py``, which does::

    from torchvision.models.resnet import Bottleneck, BasicBlock

and uses these two classes exclusively for ``isinstance`` checks inside its
torchvision-specific ResNet canonizers.  If ``import torchvision`` fails (e.g.
because the installed torchvision wheel does not match the installed torch,
"operator torchvision::nms does not exist"), :func:`import_zennit` installs a
minimal stub package ``torchvision`` / ``torchvision.models`` /
``torchvision.models.resnet`` with placeholder ``Bottleneck``/``BasicBlock``
classes into ``sys.modules`` and then imports zennit.  Nothing else of zennit
depends on torchvision; the placeholder classes are never instantiated by the
models in this repository, so zennit's ResNet canonizers simply never match.

Usage::

    from scripts.zennit_compat import import_zennit   # or sys.path tweak
    zennit = import_zennit()
    from zennit.composites import LayerMapComposite    # works afterwards
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

__all__ = ["import_zennit", "install_torchvision_stub", "residual_sum_canonizer"]

_STUB_MARKER = "__onnxlrp_torchvision_stub__"


def _torchvision_importable() -> bool:
    mod = sys.modules.get("torchvision")
    if mod is not None:
        return True  # real module or our stub already present
    try:
        importlib.import_module("torchvision.models.resnet")
        return True
    except Exception:  # ImportError, RuntimeError (operator torchvision::nms ...), ...
        return False


def install_torchvision_stub() -> types.ModuleType:
    """Put a minimal ``torchvision`` stub package into ``sys.modules``.

    Any partially imported ``torchvision*`` modules left behind by a failed
    import are removed first.  Returns the stub top-level module.
    """
    import torch  # zennit needs torch anyway

    existing = sys.modules.get("torchvision")
    if existing is not None and getattr(existing, _STUB_MARKER, False):
        return existing

    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]

    tv = types.ModuleType("torchvision")
    tv.__path__ = []  # mark as package
    # a real ModuleSpec, so importlib.util.find_spec("torchvision") works (torch.onnx's
    # dynamo exporter calls it while registering torchvision ops; it then just skips them)
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    tv.__version__ = "0.0.0+stub"
    setattr(tv, _STUB_MARKER, True)
    models = types.ModuleType("torchvision.models")
    models.__path__ = []
    models.__spec__ = importlib.machinery.ModuleSpec("torchvision.models", None, is_package=True)
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.__spec__ = importlib.machinery.ModuleSpec("torchvision.models.resnet", None)

    class BasicBlock(torch.nn.Module):  # placeholder, never instantiated
        expansion = 1

    class Bottleneck(torch.nn.Module):  # placeholder, never instantiated
        expansion = 4

    BasicBlock.__module__ = Bottleneck.__module__ = "torchvision.models.resnet"
    resnet.BasicBlock = BasicBlock
    resnet.Bottleneck = Bottleneck
    models.resnet = resnet
    tv.models = models

    sys.modules["torchvision"] = tv
    sys.modules["torchvision.models"] = models
    sys.modules["torchvision.models.resnet"] = resnet
    return tv


def import_zennit():
    """Import and return the ``zennit`` module, stubbing torchvision if it cannot be imported."""
    if "zennit" in sys.modules:
        return sys.modules["zennit"]
    if not _torchvision_importable():
        install_torchvision_stub()
    return importlib.import_module("zennit")


def residual_sum_canonizer(block_types, forward):
    """A zennit canonizer for residual blocks of ``block_types``: each gets a ``canonizer_sum``
    (``zennit.layer.Sum``, which composites can give the Norm rule) and ``forward`` as its forward,
    which must route the residual add through ``self.canonizer_sum`` (as zennit's torchvision ResNet
    canonizers do, for blocks that are not torchvision's classes)."""
    import_zennit()
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum

    class ResidualSumCanonizer(AttributeCanonizer):
        def __init__(self):
            super().__init__(self._attribute_map)

        @staticmethod
        def _attribute_map(name, module):
            if isinstance(module, block_types):
                return {"forward": forward.__get__(module), "canonizer_sum": Sum()}
            return None

        def copy(self):
            return ResidualSumCanonizer()

    return ResidualSumCanonizer()
