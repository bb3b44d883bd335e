"""Per-prompt sample diversity: the mean pairwise distance among images of the same prompt.

Reward maximisation tends to collapse a prompt's samples onto one mode (DDPO and DRaFT both
report it); the mean pairwise distance among samples of one prompt measures it. With DreamSim
features this is the "DreamSim diversity" of the literature; any feature space works.

Distance: **cosine distance**, d(a, b) = 1 − a·b / (‖a‖ ‖b‖), in [0, 2]. DreamSim itself is a
cosine distance between its embeddings (Fu et al. 2023, eq. 1), so with DreamSim features this
is exactly mean pairwise DreamSim distance; on other features (the judge's) the scale-free
cosine keeps numbers comparable across checkpoints whose feature norms drift.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def mean_pairwise_distance(
    features: torch.Tensor,
    groups: torch.Tensor,
    *,
    distance: Literal["cosine", "euclidean"] = "cosine",
) -> float:
    """Mean over groups of the mean distance between distinct samples of one group.

    Args:
        features: [N, D] features of N images (e.g. from ``build_feature_space``).
        groups: [N] int, the prompt of each image; samples are compared only within a group.
        distance: ``"cosine"`` (1 − cosine similarity, the default, see the module docstring) or
            ``"euclidean"``.

    Returns:
        The unweighted mean over groups with at least two samples (each prompt counts equally)
        of the mean over its i < j pairs. 0 means every prompt's samples are identical.

    Example::

        >>> f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
        >>> mean_pairwise_distance(f, torch.tensor([0, 0, 1, 1]))  # (1 + 0) / 2
        0.5
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got {tuple(features.shape)}")
    groups = torch.as_tensor(groups)
    if groups.shape != features.shape[:1]:
        raise ValueError(f"groups must be [N]={features.shape[0]} (one prompt id per image), got {tuple(groups.shape)}")
    features = features.detach().double().cpu()
    groups = groups.cpu()
    per_group = []
    for g in torch.unique(groups):
        f = features[groups == g]  # [n_g, D]
        n = f.shape[0]
        if n < 2:
            continue  # one sample has no pairs
        if distance == "cosine":
            unit = F.normalize(f, dim=1, eps=1e-12)
            d = (1.0 - unit @ unit.T).clamp_min(0.0)  # [n_g, n_g]; clamp rounding below 0
        elif distance == "euclidean":
            d = torch.cdist(f, f)  # [n_g, n_g]
        else:
            raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
        i, j = torch.triu_indices(n, n, offset=1)
        per_group.append(d[i, j].mean())
    if not per_group:
        raise ValueError("no prompt has two or more samples: diversity needs samples_per_prompt >= 2")
    return float(torch.stack(per_group).mean())
