"""Fréchet distance between two sets of image features (FID when the features are Inception's).

Source: Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local
Nash equilibrium", eq. (6): fit a Gaussian to each feature set and compute

    d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½).

Written out here (≈10 lines, float64, ``scipy.linalg.sqrtm``) rather than through torchmetrics:
``torchmetrics.image.fid.FrechetInceptionDistance`` takes *images* and runs its own feature
network (a custom one must accept its 299×299 probe), and its closed form is private API.
The same stabilisation as the reference implementations is used: when Σ_a Σ_b is near
singular (fewer samples than dimensions), a small multiple of the identity is added before
the square root.

Values depend on the feature space and on the number of samples (FID is biased upwards for
small sets), so only compare numbers computed with the same space and the same set sizes.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def _gaussian(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = features.detach().double().cpu().numpy()  # [N, D]
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))  # [D], [D, D] (unbiased, N − 1)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor, *, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to features_a [N, D] and features_b [M, D].

    Args:
        features_a, features_b: features of two image sets in the same space (N, M ≥ 2).
        eps: ridge added to both covariances when their product's square root is not finite.

    Returns:
        d² ≥ 0 (rounding below zero is clamped); 0 for identical sets; NaN when a set holds a non-finite
        feature (the images of a diverged model).
    """
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D] with the same D, got {tuple(features_a.shape)} "
                         f"and {tuple(features_b.shape)}")
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise ValueError("each feature set needs at least 2 samples to estimate a covariance")
    mu_a, sigma_a = _gaussian(features_a)
    mu_b, sigma_b = _gaussian(features_b)
    if not (np.isfinite(sigma_a).all() and np.isfinite(sigma_b).all()):
        return float("nan")  # non-finite images (a diverged model): no distance, and no crash in sqrtm
    covmean = linalg.sqrtm(sigma_a @ sigma_b)  # (Σ_a Σ_b)^½
    if not np.isfinite(covmean).all():
        ridge = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + ridge) @ (sigma_b + ridge))
    covmean = np.real(covmean)  # tiny imaginary parts are rounding from a non-symmetric product
    diff = mu_a - mu_b
    d2 = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
    return float(max(d2, 0.0))
