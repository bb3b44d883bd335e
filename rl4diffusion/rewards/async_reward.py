"""Scoring a batch's images on a worker thread while the next sub-batch samples (``reward_async=true``).

ddpo-pytorch (kvablack/ddpo-pytorch, ``scripts/train.py``) samples each epoch in several batches and
submits every batch's reward to a one-worker ``ThreadPoolExecutor``, collecting the results once all
sampling is done: a reward that runs somewhere else (another GPU, a server, a subprocess) then costs
little more than its last batch. ``collect_trajectories`` does the same with a ``RewardScorer``.

Scoring on the worker gives the same numbers as scoring in place:

* the batches are scored one at a time, in the order they were sampled (one worker);
* the caller's grad mode and autocast state, which are per thread in torch, are replayed on the worker;
* sampling draws its noise from the environment's and the algorithm's own ``torch.Generator``\\s, never
  from torch's global generator, so a reward that draws random numbers cannot shift it (and, since the
  sampling thread never draws from the global generator either, the reward sees the same global draws).

A reward used this way must tolerate being called from a thread other than the main one (it is never
called from two threads at once). An error it raises surfaces from ``collect_trajectories`` as it would
in place; ``reward.timeout`` (a main-thread alarm) does not bound a call on the worker.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch


class RewardScorer:
    """Scores ``(images, prompts)`` batches in submission order: on one worker thread, or at once.

    Use it as a context manager around one collection; leaving it waits for the worker to finish.

    Example::

        with RewardScorer(reward, asynchronous=True) as scorer:
            scores = [scorer.submit(images, prompts) for images, prompts in batches]  # futures
            rewards = torch.cat([s.result() for s in scores])
    """

    def __init__(self, reward, *, asynchronous: bool):
        self.reward = reward
        self.asynchronous = asynchronous
        self._worker: ThreadPoolExecutor | None = None

    def __enter__(self) -> RewardScorer:
        if self.asynchronous:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rl4diffusion-reward")
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._worker is not None:
            # normally every score has been collected already; on an error or Ctrl-C, do not wait for a reward
            # that may hang (what was queued behind it is cancelled)
            self._worker.shutdown(wait=exc_type is None, cancel_futures=True)
            self._worker = None

    def submit(self, images: torch.Tensor, prompts: list[str]) -> Future:
        """The reward [B] of ``images`` as a future (already done when scoring is synchronous)."""
        if self._worker is None:
            done = Future()
            done.set_result(self.reward(images, prompts))  # an error raises here, as an in-place call would
            return done
        device_type = images.device.type
        modes = (torch.is_grad_enabled(), torch.is_autocast_enabled(device_type),
                 torch.get_autocast_dtype(device_type))
        return self._worker.submit(_score_with_modes, self.reward, images, list(prompts), device_type, modes)


def _score_with_modes(reward, images, prompts, device_type, modes) -> torch.Tensor:
    """``reward(images, prompts)`` under the grad mode and autocast state the submitting thread had."""
    grad_enabled, autocast_enabled, autocast_dtype = modes
    autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_enabled else nullcontext()
    with torch.set_grad_enabled(grad_enabled), autocast:
        return reward(images, prompts)
