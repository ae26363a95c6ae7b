"""Per-token logprobs of the completion tokens under the distribution they were sampled from.

The engines report *processed* logprobs: vLLM with `logprobs_mode="processed_logprobs"`, the
transformers engine from `generate`'s processed scores. Both compute, per position,
    logits / temperature -> top-k mask -> top-p mask -> log-softmax
(vLLM `v1/sample/ops/topk_topp_sampler.py`, transformers' Temperature/TopK/TopP warpers: the same
order and the same tie rules). `completion_logprobs` computes exactly that from the learner's
logits, one row at a time (each row may carry its own settings: a step records what it was
sampled with), so that at the sampling version the learner's logprobs equal the engine's and the
importance ratio is 1. With `filtered=False` only the temperature is applied and the softmax
runs over the whole vocabulary (TRL's behaviour).

A sampled token that the current policy's top-k / top-p would exclude (possible once the policy
has moved: async or num_iterations > 1) has probability 0 under that distribution: its logprob
is -inf and the caller leaves it out of the loss (`Learner` counts such tokens).
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`logits` (T, V), already divided by the temperature, with the tokens outside the top-k and
    then outside the top-p nucleus set to -inf (vLLM's and transformers' rules: top-k keeps every
    token tied with the k-th; top-p drops the tokens whose ascending cumulative probability is
    <= 1 - top_p, always keeping the most likely)."""
    vocab = logits.shape[-1]
    if not (0 < top_k < vocab or top_p < 1.0):
        return logits
    with torch.no_grad():
        remove = torch.zeros_like(logits, dtype=torch.bool)
        if 0 < top_k < vocab:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            remove |= logits < kth
        if top_p < 1.0:
            masked = logits.masked_fill(remove, float("-inf"))
            sorted_logits, order = torch.sort(masked, dim=-1, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative <= 1 - top_p
            drop_sorted[..., -1] = False  # at least one token stays
            remove |= torch.zeros_like(remove).scatter(-1, order, drop_sorted)
    return logits.masked_fill(remove, float("-inf"))


def completion_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: list[float],
    top_k: list[int],
    top_p: list[float],
    filtered: bool = True,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs (B, T) of `token_ids` (B, T) under `logits` (B, T, V) scaled by each row's
    `temperature` and, when `filtered`, masked by its `top_k` (<= 0: off) and `top_p` (1.0: off),
    one value per row. Float32 whatever the logits' dtype. Also the entropies (B, T) of the same
    distributions, without gradient, when asked.

    One row at a time: the full (T, V) log-softmax of one row is the largest temporary, as in
    TRL's `selective_log_softmax`.
    """
    logps, entropies = [], []
    for i in range(logits.shape[0]):
        row = logits[i].float() / float(temperature[i])
        if filtered:
            row = filter_logits(row, int(top_k[i]), float(top_p[i]))
        row_logp = row.log_softmax(dim=-1)
        logps.append(row_logp.gather(-1, token_ids[i].unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            with torch.no_grad():
                p = row_logp.exp()
                # p * log p is 0 for a masked token (p = 0, log p = -inf), not NaN.
                entropies.append(-torch.where(p > 0, p * row_logp, torch.zeros_like(p)).sum(-1))
    return torch.stack(logps), (torch.stack(entropies) if with_entropy else None)


def fp32_output_layer(model: torch.nn.Module) -> bool:
    """Makes the model's output layer (lm_head) compute in float32 even under bf16/fp16
    autocast: the hidden states of the kept positions (only the completion's, through
    `logits_to_keep`) are cast up and multiplied by the float32 weight. bf16 logits cast up
    afterwards carry bf16's ~3 significant digits into every logprob and importance ratio.
    Returns False (nothing changed) when the output layer is not a plain Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return False

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)

    head.forward = forward  # an instance attribute: nn.Module.__call__ calls it
    return True
