"""Supervised fine-tuning (the warm start) inside the GRPO learner: token-level cross-entropy on the
completion tokens only.

Demonstrations are trajectories like any other (actors/demos.py): each step is a prompt (exact ids,
images) and a target completion. They go through the learner's own batching (`collate`,
`micro_batches`, `shard`) and its multi-rank path (gradients summed across ranks), so SFT trains
on exactly the inputs GRPO would. The loss of a batch is the sum of the target tokens' negative
log-likelihoods divided by the batch's target token count (over all ranks), so the split into
ranks and micro-batches does not change the gradient.

`sft_step(learner, groups, lr, train=True)` is called by `Learner.sft_step` / `Learner.sft_loss`.
This module does not import learner/learner.py: what it uses of a learner is the `SftLearner`
protocol below, so the two modules do not depend on each other in a cycle.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import torch
from trl.trainer.utils import selective_log_softmax

from core.trajectory import TrajectoryGroup

from . import distributed as D
from .batching import TrainingSample, micro_batches, shard, to_device
from .config import LearnerConfig
from .vision import VISION_KWARGS


class SftLearner(Protocol):
    """The parts of a `Learner` (learner/learner.py) the warm start uses."""

    rank: int
    world_size: int
    model: torch.nn.Module
    device: torch.device
    config: LearnerConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    placeholder_ids: set[int]
    _policy_version: int

    def _prepare(self, mb: list, mask_truncated: bool, image_cache: dict) -> dict[str, Any]: ...

    def _autocast(self) -> Any: ...


def sft_samples(groups: list[TrajectoryGroup]) -> list[TrainingSample]:
    """One sample per step of every trainable episode (failed episodes never), in order."""
    samples = []
    for g in groups:
        for t in g.trainable_trajectories:
            for s in t.steps:
                if not s.completion_ids or not s.prompt_ids:
                    continue
                samples.append(TrainingSample(
                    prompt_ids=list(s.prompt_ids), completion_ids=list(s.completion_ids),
                    sampling_logprobs=[0.0] * len(s.completion_ids), advantage=0.0, truncated=False,
                    policy_version=s.policy_version, episode_id=t.episode_id, group_id=g.group_id,
                    step_index=s.index, images=list(s.images),
                ))
    return samples


def completion_nll(logits: torch.Tensor, completion_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of -log p(target token): `logits` (B, T, V) predict `completion_ids` (B, T)."""
    logps = selective_log_softmax(logits.float(), completion_ids)
    return -(logps * mask).sum()


def sft_step(learner: SftLearner, groups: list[TrajectoryGroup], lr: float, train: bool = True) -> dict[str, float]:
    """One optimizer step of completion-only cross-entropy on `groups` (the same list on every
    rank), or with `train=False` only the loss (held-out evaluation, no gradient). Returns the
    whole batch's mean token loss (identical on every rank)."""
    t0 = time.perf_counter()
    samples = sft_samples(groups)
    if learner.placeholder_ids:  # as in train_step: an image token in a target cannot be re-run
        samples = [s for s in samples if not learner.placeholder_ids.intersection(s.completion_ids)]
    total_tokens = sum(len(s.completion_ids) for s in samples)
    mine = shard(samples, learner.rank, learner.world_size)
    model, dev = learner.model, learner.device
    model.train(train)
    if train:
        learner.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.float64, device=dev)
    image_cache: dict = {}
    for mb in (micro_batches(mine, learner.config.micro_batch_size) if mine else []):
        batch = to_device(learner._prepare(mb, False, image_cache), dev)  # the GRPO step's collation
        T = batch["logits_to_keep"]
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "logits_to_keep": T + 1, "use_cache": False}
        for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "position_ids", *VISION_KWARGS):
            if k in batch:
                kwargs[k] = batch[k]
        with torch.set_grad_enabled(train), learner._autocast():
            logits = model(**kwargs).logits[:, :-1, :]
            targets = batch["input_ids"][:, -T:]
            mask = batch["completion_mask"]
            nll = completion_nll(logits, targets, mask)
            if train:
                (nll / max(total_tokens, 1)).backward()
        loss_sum += nll.detach().to(torch.float64)
        correct += ((logits.detach().argmax(-1) == targets).float() * mask).sum().to(torch.float64)
    # Whole-batch sums on every rank; then (training) the summed gradients, clip, step.
    packed = D.all_reduce_(torch.stack([loss_sum, correct]), "sum").tolist()
    metrics = {
        "sft_loss": packed[0] / max(total_tokens, 1),
        "sft_token_accuracy": packed[1] / max(total_tokens, 1),
        "sft_tokens": float(total_tokens),
        "sft_samples": float(len(samples)),
    }
    if train:
        D.all_reduce_gradients_(learner.params)
        max_norm = learner.config.max_grad_norm if learner.config.max_grad_norm > 0 else math.inf
        metrics["sft_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(learner.params, max_norm))
        for group in learner.optimizer.param_groups:
            group["lr"] = lr
        if samples:
            learner.optimizer.step()
        learner.optimizer.zero_grad(set_to_none=True)
    metrics["sft_step_time_s"] = time.perf_counter() - t0
    return metrics


def finish_warm_start(learner: SftLearner) -> int:
    """After the SFT steps: the GRPO optimizer starts fresh (no SFT moments, the configured lr)
    and the policy version moves once, so every engine loads the warm-started weights."""
    learner.optimizer.state.clear()
    for group, lr in zip(learner.optimizer.param_groups, learner.scheduler.get_last_lr()):
        group["lr"] = lr
    learner._policy_version += 1
    return learner._policy_version


def split_heldout(groups: list[Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """Every k-th episode goes to the held-out demonstration set (deterministic, spread over the
    tasks); at least one episode is held out when `fraction` > 0 and there are two or more."""
    if fraction <= 0 or len(groups) < 2:
        return list(groups), []
    k = max(2, round(1 / fraction))
    held = [g for i, g in enumerate(groups) if i % k == k - 1] or [groups[-1]]
    ids = {id(g) for g in held}
    return [g for g in groups if id(g) not in ids], held
