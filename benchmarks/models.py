"""Benchmark networks in plain torch (torchvision cannot be imported here), with seeded random weights.

* ``vgg16``: torchvision's VGG16 layer structure -- ``features`` (13 conv3x3 + ReLU, 5 maxpools),
  ``classifier`` 25088-4096-4096-1000 with ReLU + Dropout; the ``AdaptiveAvgPool2d(7)`` is omitted
  (it is the identity for 224x224 inputs).
* ``resnet50``: torchvision's ResNet50 structure -- 7x7/2 stem conv + BN + ReLU, 3x3/2 maxpool
  (padding 1), bottleneck blocks [3, 4, 6, 3] (stride on the 3x3 conv, 1x1-conv+BN downsample),
  global average pool, fc 2048-1000.  The residual add is a plain ``+`` (ONNX ``Add``);
  :func:`residual_sum_canonizer` routes it through ``zennit.layer.Sum`` for Zennit.

Weights: Kaiming-normal conv/linear weights, U(-0.1, 0.1) biases, every BatchNorm with
non-trivial running statistics and affine parameters.  ``build_model(name)`` is deterministic
(seeded), so a child process rebuilds exactly the weights that were exported to ONNX.

Export: ``export_onnx(name, cache_dir)`` writes ``<cache_dir>/<name>.onnx`` with
``torch.onnx.export(dynamo=False, opset_version=17)`` and a dynamic batch axis.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

MODEL_SEEDS = {"vgg16": 16, "resnet50": 50}
INPUT_SHAPE = (3, 224, 224)
NUM_CLASSES = 1000
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


# ------------------------------------------------------------------------------------------------
# VGG16
# ------------------------------------------------------------------------------------------------
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        layers, cin = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


# ------------------------------------------------------------------------------------------------
# ResNet50
# ------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: stride on the 3x3 conv).

    Module registration order == forward order of the leaves (SequentialMergeBatchNorm relies on it):
    conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, [downsample conv, bn], relu3.
    """
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))
        else:
            self.downsample = None
        self.relu3 = nn.ReLU()

    def branches(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return identity, out

    def forward(self, x):
        identity, out = self.branches(x)
        return self.relu3(out + identity)


class ResNet50(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin, stages = 64, []
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(cin, width, stride))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


MODELS = {"vgg16": VGG16, "resnet50": ResNet50}


def init_parameters(model: nn.Module) -> None:
    """Random weights from the global torch RNG (seeded by the caller); BN with non-trivial stats."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.uniform_(m.bias, -0.1, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c))
                m.running_var.copy_(0.5 + torch.rand(c))
                # gamma < 1 keeps the 16 residual stages of ResNet50 from blowing up the activations
                m.weight.copy_(0.2 + 0.3 * torch.rand(c))
                m.bias.copy_(0.1 * torch.randn(c))


def build_model(name: str) -> nn.Module:
    """The seeded, eval-mode float32 model ``name`` ('vgg16' or 'resnet50')."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(MODEL_SEEDS[name])
    model = MODELS[name]()
    init_parameters(model)
    return model.float().eval()


def export_onnx(name: str, cache_dir, force=False) -> Path:
    """``<cache_dir>/<name>.onnx`` (exported once, then reused): legacy exporter, opset 17, dynamic batch."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}.onnx"
    if path.exists() and not force:
        return path
    model = build_model(name)
    x = torch.zeros((1,) + INPUT_SHAPE)
    tmp = path.with_suffix(f".tmp{os.getpid()}.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# Zennit helpers (imported lazily: zennit needs the torchvision stub, see scripts/zennit_compat.py)
# ------------------------------------------------------------------------------------------------
def _residual_forward(self, x):
    identity, out = self.branches(x)
    return self.relu3(self.canonizer_sum(torch.stack([identity, out], dim=-1)))


def residual_sum_canonizer():
    """Routes each Bottleneck's residual add through ``zennit.layer.Sum`` (see scripts/zennit_compat.py)."""
    from zennit_compat import residual_sum_canonizer as canonizer
    return canonizer(Bottleneck, _residual_forward)
