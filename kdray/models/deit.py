"""A DeiT-style vision transformer with a distillation token (Touvron et al., ICML 2021), small enough for digits.

DeiT adds a second learned token beside the class token; it passes through the same encoder and feeds its own
linear head (``head_dist``). The class head learns from the labels, the distillation head from the teacher
(the ``deit`` knowledge term, which reads ``head_dist``'s output as a feature point). Built from torchvision's
``vision_transformer.Encoder`` (pre-norm blocks, learned position embedding, final LayerNorm), with a patch
convolution and the two tokens in front, as torchvision's ``VisionTransformer`` does for its one token.

What ``forward`` returns (how kdray exposes DeiT's two heads as one model's logits):

* in training mode: the class head's logits (the hard-label CE trains them); ``head_dist``'s output is there
  for the hooks;
* in eval mode, ``inference: average`` (the paper's inference): ``log((softmax(cls) + softmax(dist)) / 2)``,
  log-probabilities whose softmax is the average of the two heads' softmaxes, so accuracy, CE and any later
  teacher use see the paper's fused prediction; ``inference: cls`` or ``dist`` gives one head's logits.

A student trained without the ``deit`` term leaves ``head_dist`` untrained: evaluate such a model (a scratch
baseline) with ``inference: cls``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.models.registry import register_model

INFERENCE = ("average", "cls", "dist")


class DeiTViT(nn.Module):
    def __init__(self, num_classes: int = 10, image_size: int = 8, patch_size: int = 2, in_channels: int = 1,
                 hidden_dim: int = 32, depth: int = 2, heads: int = 4, mlp_dim: int = 64, dropout: float = 0.0,
                 inference: str = "average"):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"deit_vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if hidden_dim % heads:
            raise ValueError(f"deit_vit: hidden_dim {hidden_dim} is not a multiple of heads {heads}")
        if inference not in INFERENCE:
            raise ValueError(f"deit_vit: unknown inference {inference!r}; allowed: {', '.join(INFERENCE)}")
        self.inference = inference
        self.patch_size = patch_size
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        nn.init.trunc_normal_(self.class_token, std=0.02)  # DeiT's init of both tokens
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        seq_length = (image_size // patch_size) ** 2 + 2
        # imported here: torchvision (it pulls in torch._dynamo) costs every process that imports kdray.models
        from torchvision.models.vision_transformer import Encoder
        self.encoder = Encoder(seq_length, depth, heads, hidden_dim, mlp_dim, dropout, 0.0)
        self.cls_embedding = nn.Identity()  # the class token's final representation (a feature point)
        self.dist_embedding = nn.Identity()  # the distillation token's
        self.head = nn.Linear(hidden_dim, num_classes)
        self.head_dist = nn.Linear(hidden_dim, num_classes)
        self.kd_stages = [f"encoder.layers.encoder_layer_{i}" for i in range(depth)]
        self.kd_embedding = "cls_embedding"

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class head's and the distillation head's logits."""
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, patches, hidden)
        b = tokens.shape[0]
        tokens = torch.cat([self.class_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), tokens], 1)
        z = self.encoder(tokens)
        return self.head(self.cls_embedding(z[:, 0])), self.head_dist(self.dist_embedding(z[:, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, dist = self.heads(x)
        if self.training or self.inference == "cls":
            return cls
        if self.inference == "dist":
            return dist
        return averaged_log_probs(cls, dist)


def averaged_log_probs(cls: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """``log((softmax(cls) + softmax(dist)) / 2)``, stably (log-sum-exp of the two log-softmaxes)."""
    both = torch.stack([F.log_softmax(cls, dim=1), F.log_softmax(dist, dim=1)])
    return torch.logsumexp(both, dim=0) - math.log(2.0)


@register_model("deit_vit", family="transformer")
def deit_vit(num_classes: int = 10, image_size: int = 8, patch_size: int = 2, in_channels: int = 1,
             hidden_dim: int = 32, depth: int = 2, heads: int = 4, mlp_dim: int = 64, dropout: float = 0.0,
             inference: str = "average"):
    return DeiTViT(num_classes, image_size, patch_size, in_channels, hidden_dim, depth, heads, mlp_dim, dropout,
                   inference)
