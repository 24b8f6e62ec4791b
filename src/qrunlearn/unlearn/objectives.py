"""Unlearning objectives as pure functions (paper.md's definitions), in two layers:

1. per-position statistics of a batch: the NLL of each next token, and KL(p_ref || p_theta) at each position;
   from full logits (`token_nll`, `token_kl`) or, for large vocabularies, chunk by chunk from the final hidden
   states without ever holding the whole batch's fp32 logits (`qrunlearn.unlearn.chunked`);
2. the losses built from them (`*_from_tokens`), which therefore do not care how the statistics were computed.

The logits-level functions (`ga_loss`, `npo_loss`, ...) compose the two for callers holding logits.

Conventions: `logits` is [B, T, V] from a causal LM on `input_ids` [B, T]; `labels` is [B, T] with -100 on
padding (and anything else not to score). Position t predicts token t+1, so statistics have T - 1 positions.

Each loss is a mean, and its denominator can be given from outside (`num_tokens` / `num_sequences`): the
training loop passes the count of the whole *global* batch (all micro-batches of an optimizer step on all
processes), so gradient accumulation and DDP give exactly the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---- per-position statistics --------------------------------------------------------------------------------------
def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits[:, :-1], labels[:, 1:], mask of scored positions)."""
    next_labels = labels[:, 1:]
    return logits[:, :-1], next_labels, next_labels != IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL [B, T-1] (0 on masked positions) and the mask, in fp32.

    Scored at all T positions against the labels shifted left (the last position scores nothing), and only the
    [B, T] result is cut to T - 1: slicing the [B, T, V] logits instead would copy them in the forward pass and
    zero-fill a full-size gradient in the backward pass (in a SmolLM2 step's profile, copies and fills fell from
    4.8 s to 3.8 s of ~32 s)."""
    targets = next_token_targets(labels)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(targets.shape)
    return nll[:, :-1], targets[:, :-1] != IGNORE_INDEX


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T]: position t's target, the label at t + 1 (IGNORE_INDEX at the last position, which predicts nothing)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(p_ref || p_theta) [B, T-1] over the next-token distributions (unmasked) and the mask, from
    log-softmax of both (not raw logits); formed at all T positions and then cut, as `token_nll`."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_ref = F.log_softmax(ref_logits.float(), dim=-1)
    return (log_ref.exp() * (log_ref - log_p)).sum(dim=-1)[:, :-1], labels[:, 1:] != IGNORE_INDEX


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL [B] (= -log pi(x)) and per-sequence scored-token counts [B]."""
    return sequence_sums(*token_nll(logits, labels))


def sequence_sums(nll: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of a per-position statistic (0 on padding) and the rows' scored-token counts. Summed in fp64
    and rounded once to fp32, so a sequence's sum does not depend on how wide its batch was padded (a fp32
    reduction over a wider row groups its additions differently): NPO's log-ratio at step 0 is then exactly 0."""
    return nll.double().sum(dim=1).to(nll.dtype), mask.sum(dim=1)


# ---- losses from the statistics ---------------------------------------------------------------------------------
def _denominator(given: float | None, local: torch.Tensor) -> torch.Tensor | float:
    return local.clamp(min=1) if given is None else given


def nll_from_tokens(nll: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Token-mean NLL (what HF's `model(...).loss` is; GDR's retain loss). `nll` is 0 on masked positions."""
    return nll.sum() / _denominator(num_tokens, mask.sum())


def npo_from_sequences(nll: torch.Tensor, ref_sequence_nll: torch.Tensor, beta: float,
                       num_sequences: float | None = None) -> torch.Tensor:
    """NPO: mean over sequences of -(2/beta) * logsigmoid(beta * (NLL_theta(x) - NLL_ref(x))), NLLs summed over
    each sequence's tokens. At theta = ref its gradient is that of -mean_x NLL_theta(x) (GA on summed NLL)."""
    per_sequence = -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_sequence_nll.to(nll)))
    return per_sequence.sum() / (nll.numel() if num_sequences is None else num_sequences)


def simnpo_from_sequences(nll: torch.Tensor, count: torch.Tensor, beta: float, delta: float = 0.0,
                          num_sequences: float | None = None) -> torch.Tensor:
    """SimNPO: mean over sequences of -(2/beta) * logsigmoid(beta * (NLL_theta(x) / |x| - delta)), |x| the
    number of scored tokens; no reference model."""
    per_sequence = -(2.0 / beta) * F.logsigmoid(beta * (nll / count.clamp(min=1) - delta))
    return per_sequence.sum() / (nll.numel() if num_sequences is None else num_sequences)


def kl_from_tokens(kl: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """KLR: token-mean KL(p_ref || p_theta) over the scored positions, padding masked."""
    return (kl * mask).sum() / _denominator(num_tokens, mask.sum())


def combine(forget: torch.Tensor | None, retain: torch.Tensor | None, gamma: float, alpha: float) -> torch.Tensor:
    """loss = gamma * forget + alpha * retain (a term is None when it is absent: no retain term, or a forward pass
    over retain rows only)."""
    if forget is None:
        if retain is None:
            raise ValueError("combine: no forget and no retain term")
        return alpha * retain
    return gamma * forget if retain is None else gamma * forget + alpha * retain


# ---- the same losses from logits ----------------------------------------------------------------------------------
def nll_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    return nll_from_tokens(*token_nll(logits, labels), num_tokens=num_tokens)


def ga_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Gradient ascent: -NLL (token mean, as MUSE and open-unlearning use the model's loss)."""
    return -nll_loss(logits, labels, num_tokens)


def npo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_sequence_nll: torch.Tensor, beta: float,
             num_sequences: float | None = None) -> torch.Tensor:
    return npo_from_sequences(sequence_nll(logits, labels)[0], ref_sequence_nll, beta, num_sequences)


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, delta: float = 0.0,
                num_sequences: float | None = None) -> torch.Tensor:
    nll, count = sequence_nll(logits, labels)
    return simnpo_from_sequences(nll, count, beta, delta, num_sequences)


def kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
            num_tokens: float | None = None) -> torch.Tensor:
    return kl_from_tokens(*token_kl(logits, ref_logits, labels), num_tokens=num_tokens)


# ---- the field's other forget objectives ---------------------------------------------------------------------------
def wga_from_tokens(nll: torch.Tensor, mask: torch.Tensor, power: float,
                    num_tokens: float | None = None) -> torch.Tensor:
    """WGA, weighted gradient ascent (Wang et al., "Rethinking LLM unlearning objectives: a gradient perspective and
    go beyond", ICLR 2025, arXiv 2502.19301): -mean_t w_t * NLL_t with w_t = p_t ** power, p_t = exp(-NLL_t) the
    token's probability, held constant (detached). Tokens the model already gives low probability get little
    weight, so GA's unbounded push on them stops. open-unlearning's `compute_wga_loss` is the same (power = its beta,
    default 1). Masked positions have NLL 0 and add nothing."""
    weight = torch.exp(-nll.detach()).pow(power)
    return -(weight * nll).sum() / _denominator(num_tokens, mask.sum())


def satimp_from_tokens(nll: torch.Tensor, mask: torch.Tensor, saturation_power: float, importance_power: float,
                       num_tokens: float | None = None) -> torch.Tensor:
    """SatImp (Yang et al., "Exploring criteria of loss reweighting to enhance LLM unlearning", ICML 2025, arXiv
    2505.11953): -mean_t w_t * NLL_t with w_t = p_t ** saturation_power * (1 - p_t) ** importance_power (p_t as in
    WGA, detached): saturation weights down tokens already forgotten, importance weights down tokens the model is
    certain of. open-unlearning's `compute_satimp_loss` is the same (beta1 = 5, beta2 = 1)."""
    probability = torch.exp(-nll.detach())
    weight = probability.pow(saturation_power) * (1.0 - probability).pow(importance_power)
    return -(weight * nll).sum() / _denominator(num_tokens, mask.sum())


def undial_token_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                      strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """UNDIAL (Dong et al., "UNDIAL: self-distillation with adjusted logits for robust unlearning in large language
    models", NAACL 2025, arXiv 2402.10052), per position [B, T-1] (0 on masked positions) and the mask: the
    cross-entropy H(q, p_theta) = -sum_v q_v log p_theta(v) toward q = softmax(z_ref - strength * onehot(y)), the
    reference's next-token distribution with the true next token's logit lowered by `strength`. Its gradient in the
    logits is p_theta - q: at the reference it lowers exactly the true token's probability, and it is bounded
    (unlike GA's). Where our reading differs from open-unlearning's `compute_undial_loss`: that code indexes the
    one-hot with the shifted labels including -100 (which marks vocabulary entry V - 100 on padding) and averages
    over padded positions; here padding is masked and the mean is over scored tokens, as every other loss."""
    targets = next_token_targets(labels)
    mask = targets != IGNORE_INDEX
    adjusted = ref_logits.detach().float().scatter_add(
        -1, targets.clamp(min=0).unsqueeze(-1), (-strength * mask.float()).unsqueeze(-1))
    soft_target = F.softmax(adjusted, dim=-1)
    cross_entropy = -(soft_target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    return (cross_entropy * mask)[:, :-1], mask[:, :-1]


def dpo_from_sequences(preferred_nll: torch.Tensor, rejected_nll: torch.Tensor, ref_preferred_nll: torch.Tensor,
                       ref_rejected_nll: torch.Tensor, beta: float,
                       num_sequences: float | None = None) -> torch.Tensor:
    """DPO (Rafailov et al., NeurIPS 2023) as TOFU's IdkDPO uses it (Maini et al., arXiv 2401.06121): per pair,
    -(2/beta) * logsigmoid(beta * ((NLL_ref(w) - NLL_theta(w)) - (NLL_ref(l) - NLL_theta(l)))), w the preferred
    answer (a refusal), l the rejected one (the forget answer), NLLs summed over each answer's tokens. The 2/beta
    scale is open-unlearning's `compute_dpo_loss` (and NPO's): Rafailov's loss is this times beta/2. At theta = ref
    the gradient is that of NLL_theta(w) - NLL_theta(l): learn the refusal, unlearn the answer, at equal weight."""
    margin = (ref_preferred_nll.to(preferred_nll) - preferred_nll) - (ref_rejected_nll.to(rejected_nll) - rejected_nll)
    per_pair = -(2.0 / beta) * F.logsigmoid(beta * margin)
    return per_pair.sum() / (per_pair.numel() if num_sequences is None else num_sequences)


def control_vector(width: int, coefficient: float, seed: int) -> torch.Tensor:
    """RMU's fixed random direction scaled to `coefficient` (Li et al., "The WMDP benchmark", arXiv 2403.03218):
    u ~ U[0, 1)^width from the run's seed, u / ||u|| * c (WMDP's and open-unlearning's `torch.rand`)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.rand(width, generator=generator, dtype=torch.float64)
    return (direction / direction.norm() * coefficient).float()


def activation_mse_from_states(states: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                               num_sequences: float | None = None) -> torch.Tensor:
    """RMU's losses on hidden states [B, T, H]: per sequence, the mean over its unpadded positions of the mean over
    features of (h - target)^2; then the mean over sequences (open-unlearning's `compute_activation_loss`). The
    forget term's target is the control vector (broadcast), the retain term's the frozen model's states."""
    per_position = (states.float() - target.float()).pow(2).mean(dim=-1)
    weights = mask.to(per_position.dtype)
    per_sequence = (per_position * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return per_sequence.sum() / (per_sequence.numel() if num_sequences is None else num_sequences)
