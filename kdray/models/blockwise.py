"""The block-wise searched student (DNA, Li et al. CVPR 2020): a chain of candidate conv blocks + a linear head.

A block is named by its choice (``width``, ``depth``, ``kernel``) and its interface with the teacher's block at
the same position (``cin`` input channels, ``cout`` output channels, ``down`` spatial down-sampling factor):
``depth`` x (Conv kxk -> BN -> ReLU) at ``width`` channels, a max-pool by ``down``, and, when ``width != cout``,
a 1x1 conv + BN + ReLU projecting to the teacher's ``cout`` channels (the block ends in a ReLU
like the teacher's stages). Keeping the teacher's channel count at block
boundaries is what lets each block be trained alone on the teacher's features and the chosen blocks be chained
afterwards; the projection is counted in the student's parameters. The head is global average pooling and a
linear layer, as in ``digits_cnn``.

``create_model("blockwise_student", 10, blocks=[{...}, {...}])`` builds it, so the assembled student trains,
checkpoints, logs to MLflow and reloads like any registered student. ``init``: a ``state_dict`` file the
student starts from (the block search writes one with the blocks it trained on the teacher's features and the
teacher's classifier); it must exist where the model is built.
"""
from __future__ import annotations

import torch.nn as nn

from kdray.models.registry import register_model

BLOCK_KEYS = ("cin", "cout", "width", "depth", "kernel", "down")


def candidate_block(cin: int, cout: int, width: int, depth: int = 1, kernel: int = 3, down: int = 1) -> nn.Sequential:
    """One candidate block (see the module docstring)."""
    for key, value in (("cin", cin), ("cout", cout), ("width", width), ("depth", depth), ("down", down)):
        if int(value) < 1:
            raise ValueError(f"block {key} must be >= 1, got {value}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"block kernel must be odd and >= 1 (same padding), got {kernel}")
    layers: list[nn.Module] = []
    c = cin
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    if down > 1:
        layers.append(nn.MaxPool2d(down))
    if width != cout:
        layers += [nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers)


def block_name(block: dict) -> str:
    """Short name of a block choice, e.g. ``w4-d1-k3``."""
    return f"w{block['width']}-d{block['depth']}-k{block['kernel']}"


class BlockwiseStudent(nn.Module):
    """Chosen blocks in sequence, then global average pooling and a linear classifier."""

    def __init__(self, blocks: list[dict], num_classes: int = 10, init: str | None = None):
        super().__init__()
        if not blocks:
            raise ValueError("blockwise_student needs at least one block")
        for i, b in enumerate(blocks):
            missing = [k for k in BLOCK_KEYS if k not in b]
            extra = sorted(set(b) - set(BLOCK_KEYS))
            if missing or extra:
                raise ValueError(f"blockwise_student block {i}: missing {missing} / unknown {extra}; "
                                 f"each block needs {', '.join(BLOCK_KEYS)}")
            if i and b["cin"] != blocks[i - 1]["cout"]:
                raise ValueError(f"blockwise_student block {i}: cin {b['cin']} != block {i - 1}'s cout "
                                 f"{blocks[i - 1]['cout']}")
        self.blocks = nn.Sequential(*[candidate_block(**{k: int(b[k]) for k in BLOCK_KEYS}) for b in blocks])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(int(blocks[-1]["cout"]), num_classes)
        self.kd_stages = [f"blocks.{i}" for i in range(len(blocks))]
        self.kd_embedding = "pool"
        if init is not None:
            import os

            import torch

            if not os.path.isfile(init):
                raise ValueError(f"blockwise_student init {init!r} is not a file (the block search's "
                                 f"initial weights); remove init to start from random weights")
            self.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))

    def forward(self, x):
        return self.fc(self.pool(self.blocks(x)).flatten(1))


@register_model("blockwise_student", family="blockwise")
def blockwise_student(num_classes: int = 10, blocks: list | None = None, init: str | None = None):
    return BlockwiseStudent(list(blocks or []), num_classes, init)
