"""Sample metrics: feature spaces, per-prompt diversity, Fréchet distance, paired win rate.

    from rl4diffusion.metrics import build_feature_space, mean_pairwise_distance, frechet_distance, win_rate
    space = build_feature_space("auto", kind="diversity")      # DreamSim if it loads, else the judge
    diversity = mean_pairwise_distance(space(images), groups)  # report it with space.name
"""

from rl4diffusion.metrics.diversity import mean_pairwise_distance
from rl4diffusion.metrics.features import (
    FeatureSpace,
    available_feature_spaces,
    build_feature_space,
    register_feature_space,
)
from rl4diffusion.metrics.fid import frechet_distance
from rl4diffusion.metrics.winrate import WinRate, win_rate

__all__ = [
    "FeatureSpace",
    "WinRate",
    "available_feature_spaces",
    "build_feature_space",
    "frechet_distance",
    "mean_pairwise_distance",
    "register_feature_space",
    "win_rate",
]

# register the heavy feature spaces (their modules import dreamsim / torchmetrics lazily)
from rl4diffusion.metrics import dreamsim_space, inception_space  # noqa: E402, F401
