"""Lets the PyPI torchvision wheel import on the CPU build of torch (installed by the Makefile as a .pth hook).

The torchvision 0.28.0 wheel on PyPI is built against CUDA torch: its compiled ops library (``_C.so``) needs
``libtorch_cuda.so`` and does not load beside torch 2.13.0+cpu. torchvision then fails at import, because it
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` without checking that the ops exist.
This hook defines those two op schemas just before torchvision is first imported, so the pure-Python parts
(``transforms.v2``, which transformers' Qwen-VL image and video processors use) work. The compiled detection
ops (nms, roi_align, ...) stay unavailable: calling one raises. When ``_C.so`` does load, nothing is done.
"""

import importlib.abc
import sys

__all__ = ["TorchvisionCpuFinder"]


class TorchvisionCpuFinder(importlib.abc.MetaPathFinder):
    """Runs once, on the first ``import torchvision``; then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        _define_missing_ops()
        return None  # the normal finders import torchvision


def _define_missing_ops() -> None:
    import glob
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    for library in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(library)
            return  # a matching build: the real ops are there
        except (OSError, RuntimeError):
            pass
    global _LIBRARY
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_LIBRARY = None
sys.meta_path.insert(0, TorchvisionCpuFinder())
