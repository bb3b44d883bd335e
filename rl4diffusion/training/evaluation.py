"""Evaluation on fixed seeds: reward, diversity and FID of samples, so that the base model and
every checkpoint are compared on the same noise (paired)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_fixed(policy, prompts: list[str], *, samples_per_prompt: int, seed: int, batch_size: int = 64,
                 use_reference: bool = False) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Sample ``samples_per_prompt`` images of each prompt with noise fixed by ``seed``.

    Returns (images [N,3,H,W], the prompt of each image, its prompt index [N]).
    """
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    groups = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    images = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        images.append(policy.sample(chunk, generator=generator, use_reference=use_reference)["images"])
    return torch.cat(images), flat, groups


@torch.no_grad()
def evaluate(policy, reward, prompts: list[str], *, samples_per_prompt: int, seed: int, metrics=None,
             name: str = "eval", use_reference: bool = False) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Reward statistics (and diversity / FID / win rate when ``metrics`` is an EvalMetrics) of
    fixed-seed samples.

    Returns (stats, per-image rewards [N], images [N,3,H,W]). Reward queries made here are
    evaluation queries: the caller keeps them out of the training budget.
    """
    images, flat, groups = sample_fixed(policy, prompts, samples_per_prompt=samples_per_prompt, seed=seed,
                                        use_reference=use_reference)
    rewards = reward(images, flat).float()
    return image_stats(images, rewards, groups, flat, metrics=metrics, name=name), rewards, images


def image_stats(images, rewards, groups, prompts: list[str], *, metrics=None, name: str = "eval") -> dict:
    """Reward mean and std of evaluation images (and the EvalMetrics ``metrics``' statistics, when given)."""
    stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False))}
    if metrics is not None:
        stats.update(metrics(name, images, groups, rewards, prompts=prompts))
    return stats


class EvalMetrics:
    """Diversity, FID (vs a reference dataset and vs the base model's samples) and the paired win
    rate against the base model, for fixed-seed evaluation samples — and, for prompt sets of the
    shapes world, the held-out evaluator's view (``rl4diffusion.zoo.evaluator``, never a training
    reward): ``evaluator_accuracy`` (colour and shape both right), ``evaluator_logprob``,
    ``evaluator_diversity`` and ``evaluator_fid_dataset`` / ``evaluator_fid_base`` in its features, and
    ``sample_evaluator_correct`` (1/0 per image, for net accuracy flips between two evaluations).

    The first call for a prompt set must be the base model's (step 0): its features and rewards
    become the reference for ``fid_base`` and ``win_rate``. Every record names the feature spaces
    used (``diversity_space``, ``fid_space``): DreamSim / Inception when their weights are present,
    the embedded judge's features otherwise.

    Args:
        device: where the feature networks run.
        feature_space: "auto" or a registered name (see ``rl4diffusion.metrics``).
        references: prompt-set name → reference images [N, 3, H, W] for ``fid_dataset`` (optional).
    """

    def __init__(self, device, feature_space: str = "auto", references: dict[str, torch.Tensor] | None = None):
        from rl4diffusion.metrics.features import auto_feature_space, build_feature_space, fallback_note

        if feature_space == "auto":  # an offline run says once, in one line, that it fell back
            choices = {kind: auto_feature_space(kind, device) for kind in ("diversity", "fid")}
            note = fallback_note(choices)
            if note:
                log.info(note)
            self.diversity_space, self.fid_space = choices["diversity"][0], choices["fid"][0]
        else:
            self.diversity_space = build_feature_space(feature_space, device, kind="diversity")
            self.fid_space = build_feature_space(feature_space, device, kind="fid")
        self.reference_features = {k: self.fid_space(v) for k, v in (references or {}).items()}
        self.base: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # the held-out evaluator: a tiny network, so it is always loaded
        self.evaluator_space = build_feature_space("evaluator", device)
        self.evaluator_reference = {k: self.evaluator_space(v) for k, v in (references or {}).items()}
        self.evaluator_base: dict[str, torch.Tensor] = {}

    def set_base(self, name: str, images: torch.Tensor, rewards: torch.Tensor) -> None:
        self.base[name] = (self.fid_space(images), rewards.detach().float().cpu())
        self.evaluator_base[name] = self.evaluator_space(images)

    @torch.no_grad()
    def __call__(self, name: str, images: torch.Tensor, groups: torch.Tensor, rewards: torch.Tensor,
                 prompts: list[str] | None = None) -> dict:
        """The metrics of one evaluation of prompt set ``name``; ``prompts`` (one per image) turn on the
        evaluator's when they all belong to the shapes world."""
        from rl4diffusion.metrics import frechet_distance, mean_pairwise_distance, win_rate

        if name not in self.base:
            self.set_base(name, images, rewards)
        features = self.fid_space(images)
        out = {
            "diversity": mean_pairwise_distance(self.diversity_space(images), groups),
            "diversity_space": self.diversity_space.name,
            "fid_space": self.fid_space.name,
        }
        if name in self.reference_features:
            out["fid_dataset"] = frechet_distance(features, self.reference_features[name])
        base_features, base_rewards = self.base[name]
        out["fid_base"] = frechet_distance(features, base_features)
        win = win_rate(rewards.detach().float().cpu(), base_rewards)
        out.update(win_rate=win.rate, win_rate_low=win.low, win_rate_high=win.high)
        if prompts is not None and in_shapes_world(prompts):
            out.update(self._evaluator_metrics(name, images, groups, prompts))
        return out

    def _evaluator_metrics(self, name: str, images: torch.Tensor, groups: torch.Tensor,
                           prompts: list[str]) -> dict:
        from rl4diffusion.metrics import frechet_distance, mean_pairwise_distance
        from rl4diffusion.zoo.evaluator import label_scores
        from rl4diffusion.zoo.shapes import parse_prompt

        features = self.evaluator_space(images)  # [N, 192]
        colour_logits, shape_logits = self.evaluator_space.evaluator.heads(features)
        labels = torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long, device=features.device)
        correct, logprob = label_scores(colour_logits, shape_logits, labels)
        out = {
            "evaluator_accuracy": float(correct.float().mean()),
            "evaluator_logprob": float(logprob.mean()),
            "evaluator_diversity": mean_pairwise_distance(features, groups),
            "evaluator_fid_base": frechet_distance(features, self.evaluator_base[name]),
        }
        if name in self.evaluator_reference:
            out["evaluator_fid_dataset"] = frechet_distance(features, self.evaluator_reference[name])
        out["sample_evaluator_correct"] = [int(c) for c in correct.tolist()]
        out["sample_evaluator_logprob"] = [float(v) for v in logprob.tolist()]  # full precision, per image
        return out


def in_shapes_world(prompts: list[str]) -> bool:
    """Whether every prompt is a shapes-world caption, which the judge and the evaluator can score."""
    from rl4diffusion.zoo.shapes import parse_prompt

    try:
        for p in dict.fromkeys(prompts):
            parse_prompt(p)
    except ValueError:
        return False
    return True


def reference_images(prompts: list[str], n: int, seed: int) -> torch.Tensor | None:
    """Dataset images for ``prompts`` when they belong to the shapes world (for FID vs the data)."""
    from rl4diffusion.zoo.shapes import sample_shapes

    if not in_shapes_world(prompts):
        return None
    flat = [prompts[i % len(prompts)] for i in range(n)]
    return sample_shapes(n, torch.Generator().manual_seed(seed), prompts=flat)[0]
