"""GRPO's pieces as plain torch functions (no Ray, no model): unit-testable one by one.

- `group_advantages`: each rollout's reward minus its group's mean, divided by the group's
  standard deviation (GRPO; `scale=False` centres only). A group whose rewards are all equal
  gets advantage 0 everywhere: it carries no signal, only the KL term.
- `token_logprobs`: log pi(token | prefix) of each target token, without materialising the
  full log-softmax.
- `clipped_surrogate`: PPO's per-token objective min(r A, clip(r, 1-eps, 1+eps) A) with
  r = pi / pi_old, as a loss (negated).
- `kl_k3`: the k3 estimator of KL(pi || pi_ref) per token, exp(q - p) - (q - p) - 1 with
  p = log pi and q = log pi_ref (unbiased, always >= 0).
- `grpo_token_losses`: the per-token loss surrogate + kl_coef * k3, and the statistics the
  update logs; the caller sums it over completion tokens and divides by their count in the
  global batch (every token weighs the same, as in the SFT loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [groups, n] -> advantages [groups, n]."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return centred / (std + eps)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> log p(target) [B, T] (float32)."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) at tokens sampled from pi."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss -min(r A, clip(r) A), whether the clip was active) for advantages
    broadcast over tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).detach()


@dataclass
class TokenStats:
    """Sums over the completion tokens of a batch (divide by `tokens` for means)."""

    tokens: float
    surrogate: float
    kl: float
    clipped: float
    ratio: float


def grpo_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
) -> tuple[torch.Tensor, TokenStats]:
    """The summed loss over completion tokens (`mask` 1 there, 0 on prompt and padding) of
    per-token surrogate + kl_coef * k3, and its statistics. `advantages` is [B] (one per
    rollout) or [B, T]."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    mask = mask.to(logp.dtype)
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    kl = kl_k3(logp, ref_logp)
    per_token = surrogate + kl_coef * kl
    loss = (per_token * mask).sum()
    with torch.no_grad():
        stats = TokenStats(
            tokens=float(mask.sum()),
            surrogate=float((surrogate * mask).sum()),
            kl=float((kl * mask).sum()),
            clipped=float((clipped.to(mask.dtype) * mask).sum()),
            ratio=float((torch.exp(logp - old_logp) * mask).sum()),
        )
    return loss, stats
