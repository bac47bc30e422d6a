"""The four training objectives as pure functions of per-sample quantities (docs/METHOD.md, training methods).

Conventions, stated once:
- Diffusion-DPO: loss = -log sigmoid(-beta/2 * ((e_w - e_w_ref) - (e_l - e_l_ref))), e = per-sample mean
  squared error of the model's prediction (epsilon or v, whatever the model predicts). beta = 5000 here is
  the published script that writes beta/2 (Wallace et al.); the script that writes beta without the 1/2
  calls the same loss beta = 2500.
- Diffusion-DPO for flow matching (MMDiT, SD3-family): the same function and the same beta (beta/2 form,
  default 5000), with e = the velocity error ||(noise - x0) - v_hat||^2 at the same noised point
  x_sigma = (1 - sigma) x0 + sigma noise for winner and loser. Since noise_hat - noise = (1 - sigma)(v_hat - v),
  the noise error is (1 - sigma)^2 times the velocity error: a flow run at beta is an epsilon-error DPO run at
  beta / (1 - sigma)^2 per point, i.e. the same beta weighs noisy points more than it does for a UNet.
- Log-probabilities are per-step Gaussian log-densities averaged over latent elements (the DDPO
  convention, see dfusion_core.engine.ddim.step_log_prob); ratios r = exp(logp - logp_other).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.steps import mean_sq_residual


def diffusion_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                       beta: float = 5000.0) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO on per-pair denoising errors. Returns (mean loss, stats)."""
    model_diff = err_w - err_l
    ref_diff = ref_err_w - ref_err_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside)
    stats = {"implicit_acc": (inside > 0).float().mean().item() + 0.5 * (inside == 0).float().mean().item(),
             "reward_margin": (-(model_diff - ref_diff)).mean().item(), "err_w": err_w.mean().item(),
             "err_l": err_l.mean().item()}
    return loss.mean(), stats


def clipped_log_ratio(logp: torch.Tensor, logp_ref: torch.Tensor, eps: float) -> torch.Tensor:
    """log of the likelihood ratio clipped to [1 - eps, 1 + eps]."""
    return torch.clamp(logp - logp_ref, min=float(torch.log1p(torch.tensor(-eps))),
                       max=float(torch.log1p(torch.tensor(eps))))


def trajectory_dpo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_logp_w: torch.Tensor, ref_logp_l: torch.Tensor,
                        beta: float = 0.1, eps: float = 0.1) -> tuple[torch.Tensor, dict]:
    """D3PO-style per-step DPO: -log sigmoid(beta * (log r_w - log r_l)), ratios clipped to [1-eps, 1+eps]."""
    lw = clipped_log_ratio(logp_w, ref_logp_w, eps)
    ll = clipped_log_ratio(logp_l, ref_logp_l, eps)
    inside = beta * (lw - ll)
    loss = -F.logsigmoid(inside)
    clipped = torch.cat([lw != logp_w - ref_logp_w, ll != logp_l - ref_logp_l])  # exactly what the clamp changed
    stats = {"implicit_acc": (inside > 0).float().mean().item() + 0.5 * (inside == 0).float().mean().item(),
             "reward_margin": (lw - ll).mean().item(), "ratio_w": torch.exp(logp_w - ref_logp_w).mean().item(),
             "clipfrac": clipped.float().mean().item()}  # of winner and loser ratios together
    return loss.mean(), stats


def normalise_rewards(rewards: torch.Tensor, groups: list, clip: float = 5.0) -> torch.Tensor:
    """Per-prompt normalised advantages (DDPO): (r - mean_group) / (std_group + 1e-8), clipped.

    Computed in float64 (close scores on a large offset lose their differences in float32); returned in the
    rewards' floating dtype (float64 for float64 rewards: cast where used), float32 for integer rewards."""
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r64 = rewards.double()
    adv = torch.empty_like(r64)
    for k in dict.fromkeys(groups):
        idx = torch.tensor([i for i, g in enumerate(groups) if g == k])
        r = r64[idx]
        std = r.std(unbiased=False) if len(idx) > 1 else torch.zeros((), dtype=torch.float64)
        adv[idx] = (r - r.mean()) / (std + 1e-8)
    return adv.clamp(-clip, clip).to(out_dtype)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float = 0.1, dual_clip: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DDPO's PPO-clip on per-step likelihood ratios. With `dual_clip` c > 1 (dual-clip PPO, Ye et al. 2020) a
    negative advantage's loss is capped at c x |A|: PPO-clip alone leaves -A x ratio unbounded above when the
    ratio runs away (one run's ratio reached 5e5), and that one row then decides the step."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    capped = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip:
        cap = -dual_clip * advantages
        capped = (advantages < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
    stats = {"ratio": ratio.mean().item(), "clipfrac": ((ratio - 1).abs() > clip_range).float().mean().item(),
             "approx_kl": (0.5 * (logp - old_logp) ** 2).mean().item(), "dual_clipfrac": capped.float().mean().item()}
    return loss.mean(), stats


def drawable_steps(log_probs: torch.Tensor, stds: torch.Tensor, max_residual: float) -> torch.Tensor:
    """[n, steps] True where a recorded step is one the policy could have drawn: its mean squared standardised
    residual under the policy (mean_sq_residual of the policy's log-prob) is at most max_residual (a draw of the
    policy gives about 1). A fused target was drawn by the fused sampler; a policy gradient on a step the plain
    model would not take is not the policy's gradient, and with a small std it dominates every batch it is in.
    max_residual 0 keeps every step."""
    if max_residual == 0:
        return torch.ones(log_probs.shape, dtype=torch.bool)
    return mean_sq_residual(log_probs.float().cpu(), stds.float().cpu().view(1, -1)) <= max_residual


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per sample, averaged over elements (same convention as log-probs)."""
    std = std.clamp(min=1e-12)
    return (((mean_p - mean_q) ** 2) / (2 * std ** 2)).mean(dim=tuple(range(1, mean_p.ndim)))


def dpok_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, kl: torch.Tensor,
              kl_coef: float = 0.01, clip_range: float = 0.1, dual_clip: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPOK: clipped policy gradient on the reward plus kl_coef x KL to the frozen pre-trained model."""
    pg, stats = ppo_clip_loss(logp, old_logp, advantages, clip_range, dual_clip)
    loss = pg + kl_coef * kl.mean()
    stats["kl"] = kl.mean().item()
    return loss, stats
