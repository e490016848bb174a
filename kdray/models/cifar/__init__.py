"""The CIFAR model zoo of the published KD benchmarks (RepDistiller / CRD, mdistiller).

Parameter names follow those repositories exactly, so their CIFAR-100 teacher checkpoints load
with ``load_state_dict(strict=True)``. Importing this package registers every model.
"""
from kdray.models.cifar import mobilenetv2, resnet, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
