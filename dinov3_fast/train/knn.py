"""kNN probe on the synthetic dataset's hidden labels: does the representation learn?

Images outside the training index range are resized to the global crop size, normalised, and
embedded by a backbone (the EMA teacher, as DINOv3 evaluates). Each validation image votes
with its k most cosine-similar training images, weighted by exp(sim / T) (DINO's kNN).
Every rank runs it (FSDP backbones need all ranks in forward); all get the same accuracy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinov3_fast.train.config import Config

_PROBE_OFFSET = 1_000_000_000  # probe images never appear in training (indices start at 0)


@torch.no_grad()
def embed(backbone: torch.nn.Module, source, idx: torch.Tensor, cfg: Config, device, chunk: int = 64
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features [N, D] and labels [N] of source images idx [N]."""
    mean = torch.tensor(cfg.crops.rgb_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.crops.rgb_std, device=device).view(1, 3, 1, 1)
    feats, labels = [], []
    for part in idx.split(chunk):
        images, lab = source.batch(part, device)
        x = F.interpolate(images, size=(cfg.crops.global_crops_size,) * 2, mode="bilinear", antialias=True,
                          align_corners=False)
        out = backbone((x - mean) / std)
        feats.append(F.normalize(out.float(), dim=-1))
        labels.append(lab)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> float:
    """Weighted kNN top-1 accuracy (features L2-normalised, [N, D] / [M, D]; labels [N] / [M])."""
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    k = min(k, train_f.shape[0])
    sim, nn_idx = (val_f @ train_f.T).topk(k, dim=1)                    # [M, k]
    votes = torch.zeros(val_f.shape[0], num_classes, device=val_f.device)
    votes.scatter_add_(1, train_y[nn_idx], (sim / temperature).exp())
    return (votes.argmax(1) == val_y).float().mean().item()


def knn_probe(backbone: torch.nn.Module, source, cfg: Config, device) -> float:
    """Top-1 kNN accuracy of `backbone` on held-out synthetic images (cfg.evaluation sizes)."""
    e = cfg.evaluation
    was_training = backbone.training
    backbone.eval()
    try:
        tr = torch.arange(_PROBE_OFFSET, _PROBE_OFFSET + e.knn_train_samples)
        va = torch.arange(_PROBE_OFFSET + e.knn_train_samples, _PROBE_OFFSET + e.knn_train_samples + e.knn_val_samples)
        tf, ty = embed(backbone, source, tr, cfg, device)
        vf, vy = embed(backbone, source, va, cfg, device)
        return knn_accuracy(tf, ty, vf, vy, k=e.knn_k, num_classes=getattr(source, "num_classes", None))
    finally:
        backbone.train(was_training)
