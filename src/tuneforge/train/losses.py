"""Loss functions. They return sums, never means: the caller divides by the target-token count of the whole
(accumulated, multi-process) batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
# Output-head options that change logits after the projection; models with any of them take the plain path.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over positions whose label is not -100, and their count. `smoothing`: HF's
    label_smoothing_factor, (1 - e) x the target's loss + e x the mean loss over the vocabulary."""
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE, reduction="sum",
                           label_smoothing=smoothing)
    return loss, (shift_labels != IGNORE).sum()


def _head_token_losses(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, smoothing: float = 0.0
                       ) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="none", label_smoothing=smoothing)


# rows per chunk on the frozen-head path: nothing of a chunk outlives it, and it runs when the forward's activations
# are all alive, so smaller chunks lower the peak (SmolLM2 LoRA, 49k vocabulary: 2.30 GB at 1024 rows, 2.07 at 256;
# compiled with selective checkpointing 1.30 GB at 256, 1.24 at 128) at the same speed (docs/benchmarks.md)
_FROZEN_HEAD_ROWS = 128
_HEAD_ROW_MULTIPLE = 16  # the last chunk is padded to this: 8 shapes in all, at most 15 rows computed for nothing
# rows whose softmax steps run together: the fp32 copy of 16 rows' logits is 3 MB at a 49k vocabulary, where a
# whole chunk's is 25 MB, and it sits at the forward's peak (the quickstart row: 20-30 MB lower peak, the same speed;
# docs/benchmarks.md). Each row's sums are its own, so the bits do not change
_SOFTMAX_ROWS = 16


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of a frozen linear head, whose gradient with respect to the hidden states is computed
    in forward, chunk by chunk, while each chunk's logits exist anyway: (softmax - one-hot) @ weight. Backward only
    scales those rows by the incoming gradient (a row's loss depends on its own hidden state only). So neither
    logits nor log-probabilities are kept for backward, and nothing is recomputed: the head's second matmul moves
    from backward to forward. Same dtypes as autograd's path through head and cross_entropy, and its arithmetic up
    to rounding: log-softmax in logsumexp's steps (max, subtract, exp, sum, log), taken in place, and the incoming
    per-row factor applied after the matmul instead of before.
    The second output is each row's entropy when `with_entropy` (RL stages log it; no gradient), else empty.
    `token_rows`, `delta`: the head's rows that train (new tokens' rows, models/vocab.py) and their values, which
    `weight` already holds. Their gradient needs only those columns of (softmax - one-hot), kept from forward.
    `smoothing` e (label smoothing): the target is (1 - e) x one-hot + e / vocabulary, so the loss is log-sum-exp
    - (1 - e) x the target's logit - e x the mean logit, and the gradient softmax minus that target."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, with_entropy, token_rows=None, delta=None,
                smoothing=0.0):
        losses, entropies, grads, columns = [], [], [], []
        for start in range(0, hidden.shape[0], chunk_size):
            rows_in, wanted = hidden[start: start + chunk_size], labels[start: start + chunk_size]
            n = len(rows_in)
            if n % _HEAD_ROW_MULTIPLE:  # a last chunk of any length would give oneDNN a new matmul shape to keep
                extra = _HEAD_ROW_MULTIPLE - n % _HEAD_ROW_MULTIPLE
                rows_in, wanted = F.pad(rows_in, (0, 0, 0, extra)), F.pad(wanted, (0, extra))
            logits = F.linear(rows_in, weight, bias)
            parts = [_softmax_minus_target(logits[i: i + _SOFTMAX_ROWS], wanted[i: i + _SOFTMAX_ROWS], smoothing,
                                           with_entropy, token_rows) for i in range(0, len(logits), _SOFTMAX_ROWS)]
            losses.append(torch.cat([loss for loss, _, _ in parts])[:n])
            if with_entropy:
                entropies.append(torch.cat([entropy for _, entropy, _ in parts])[:n])
            if token_rows is not None:
                columns.append(torch.cat([column for _, _, column in parts])[:n])
            grads.append(torch.matmul(logits, weight)[:n])  # the logits now hold softmax - one-hot
            del logits
        ctx.save_for_backward(torch.cat(grads), *((torch.cat(columns), hidden) if token_rows is not None else ()))
        ctx.hidden_dtype = hidden.dtype
        ctx.delta_dtype = None if delta is None else delta.dtype
        entropy = torch.cat(entropies) if with_entropy else hidden.new_zeros(0, dtype=torch.float32)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(losses), entropy

    @staticmethod
    def backward(ctx, grad_losses, _grad_entropy):
        grad_hidden, *for_delta = ctx.saved_tensors
        grad_delta = None
        if for_delta:  # d loss / d head row j = sum over rows of (softmax - one-hot)[row, j] * hidden[row]
            columns, hidden = for_delta
            grad_delta = ((columns * grad_losses[:, None]).T @ hidden.float()).to(ctx.delta_dtype)
        return (grad_hidden.float() * grad_losses[:, None]).to(ctx.hidden_dtype), None, None, None, None, None, \
            None, grad_delta, None


def _softmax_minus_target(logits: torch.Tensor, wanted: torch.Tensor, smoothing: float, with_entropy: bool,
                          token_rows: torch.Tensor | None) -> tuple:
    """_FrozenHeadCrossEntropy's steps for some rows of a chunk: each row's loss, its entropy (or None) and the
    `token_rows` columns of softmax - target in fp32 (or None); `logits` is overwritten with softmax - target."""
    probs = logits.float()
    rows = torch.arange(probs.shape[0], device=probs.device)
    # logsumexp's steps in place (torch.logsumexp writes a temporary of the rows' size)
    probs.sub_(probs.amax(dim=-1, keepdim=True))
    target = probs[rows, wanted]
    if smoothing:
        target = (1 - smoothing) * target + smoothing * probs.mean(dim=-1)
    shifted = probs.clone() if with_entropy else None
    probs.exp_()
    total = probs.sum(dim=-1)
    log_total = total.log()
    probs.div_(total[:, None])  # softmax
    # -sum p log p, with log p = shifted - log_total
    entropy = log_total - (probs * shifted).sum(-1) if with_entropy else None
    probs[rows, wanted] -= 1 - smoothing  # d loss / d logits = softmax - one-hot (smoothed)
    if smoothing:
        probs.sub_(smoothing / probs.shape[-1])
    logits.copy_(probs)
    return log_total - target, entropy, None if token_rows is None else probs[:, token_rows]


def _fused_head(head: torch.nn.Module, hidden: torch.Tensor) -> tuple | None:
    """(weight, bias, token_rows, delta) for _FrozenHeadCrossEntropy when `head` can take it, else None: rows to
    score, a gradient wanted, and a plain, frozen, unsharded torch Linear, or one whose only trainable part is
    PEFT's trainable token rows (new tokens under LoRA; models/vocab.py)."""
    if not (torch.is_grad_enabled() and hidden.requires_grad and len(hidden)):
        return None
    tokens, token_rows, delta = getattr(head, "token_adapter", None), None, None
    if tokens is not None:
        # PEFT's own forward of such a head leaves out any bias: one with a bias keeps to that forward
        if tokens.merged or len(tokens.active_adapters) != 1 or tokens.base_layer.bias is not None:
            return None
        if not tokens.disable_adapters:
            name = tokens.active_adapters[0]
            delta = tokens.trainable_tokens_delta[name]
            token_rows = torch.tensor(tokens.token_indices[name], device=hidden.device)
        head = tokens.base_layer
    if type(head) is not torch.nn.Linear:
        return None
    params = [p for p in (head.weight, head.bias) if p is not None]
    # sharded (FSDP's DTensor) or quantized weights are reached only through the module's own forward and hooks
    if any(p.requires_grad or type(p) is not torch.nn.Parameter for p in params):
        return None
    if delta is None:
        return head.weight, head.bias, None, None
    weight = head.weight.detach().index_copy(0, token_rows, delta.detach().to(head.weight.dtype))
    return (weight, head.bias, token_rows, delta) if delta.requires_grad else (weight, head.bias, None, None)


def chunked_token_losses(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                         chunk_size: int = 1024, smoothing: float = 0.0) -> torch.Tensor:
    """Per-row cross-entropy of `head(hidden)` against labels (one target per row, none ignored), `chunk_size` rows
    at a time.

    A frozen linear head (LoRA, freeze; under LoRA also one whose new tokens' rows train) takes
    _FrozenHeadCrossEntropy, 128 rows at a time: no logits kept, none recomputed. Otherwise (a trainable head: full
    fine-tuning), when there is more than one chunk, each chunk's logits are recomputed in the backward pass instead
    of kept, so at most one chunk of full-vocabulary fp32 logits exists at any moment.
    """
    fused = _fused_head(head, hidden)
    if fused is not None:
        weight, bias, token_rows, delta = fused
        return _FrozenHeadCrossEntropy.apply(hidden, weight, bias, labels, _FROZEN_HEAD_ROWS, False, token_rows,
                                             delta, smoothing)[0]
    if hidden.shape[0] <= chunk_size:
        return _head_token_losses(hidden, labels, head, smoothing)
    return torch.cat([checkpoint(_head_token_losses, hidden[start: start + chunk_size],
                                 labels[start: start + chunk_size], head, smoothing, use_reentrant=False)
                      for start in range(0, hidden.shape[0], chunk_size)])


def _chunk_log_probs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, with_entropy: bool):
    """head_log_probs of one chunk through the module, with _FrozenHeadCrossEntropy's arithmetic: a rollout's
    gradient-free log-probabilities and training's differ only by the rounding of other matmul shapes."""
    logits = head(hidden).float()
    shifted = logits - logits.detach().amax(dim=-1, keepdim=True)  # a constant shift: the gradient is unchanged
    exps = shifted.exp()
    total = exps.sum(dim=-1)
    log_total = total.log()
    logps = shifted.gather(-1, targets[:, None]).squeeze(-1) - log_total
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        return logps, log_total - (exps / total[:, None] * shifted).sum(-1)


def head_log_probs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, with_entropy: bool = False,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probability of each row's target under head(hidden), each row's entropy (no gradient) or None).

    As chunked_token_losses: a frozen linear head takes _FrozenHeadCrossEntropy; a trainable one, when there is
    more than one chunk, recomputes each chunk's logits in backward; without gradients the chunks run in turn. So
    at most one chunk of full-vocabulary logits exists at any moment."""
    fused = _fused_head(head, hidden)
    if fused is not None:
        weight, bias, token_rows, delta = fused
        losses, entropy = _FrozenHeadCrossEntropy.apply(hidden, weight, bias, targets, _FROZEN_HEAD_ROWS,
                                                        with_entropy, token_rows, delta)
        return -losses, entropy if with_entropy else None
    recompute = torch.is_grad_enabled() and hidden.shape[0] > chunk_size
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = (hidden[start: start + chunk_size], targets[start: start + chunk_size], head, with_entropy)
        pieces.append(checkpoint(_chunk_log_probs, *chunk, use_reentrant=False) if recompute
                      else _chunk_log_probs(*chunk))
    logps = torch.cat([p[0] for p in pieces])
    return logps, torch.cat([p[1] for p in pieces]) if with_entropy else None


def head_chunk_size(t) -> int:
    """Rows of output-head logits computed at once when the head trains (a frozen one takes the fused path). With
    gradient_checkpointing they are recomputed in backward, 256 rows at a time: at the start of backward they and
    their gradients are the largest tensors alive (about 0.4 GB in fp32 for the 700 target tokens of a 4 x 256
    SmolLM2 micro-batch, a 49k vocabulary), and recomputing them costs one more head matmul per chunk. Without it,
    up to 1024 rows are kept from forward to backward."""
    return 256 if t.gradient_checkpointing else 1024


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                          chunk_size: int = 1024, smoothing: float = 0.0) -> torch.Tensor:
    """Sum of cross-entropy of `head(hidden)` against labels, computed in chunks (see chunked_token_losses)."""
    return chunked_token_losses(hidden, head, labels, chunk_size, smoothing).sum()


def sequence_log_probs(model, split, input_ids, labels, attention_mask=None, chunk_size: int = 1024,
                       ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities of each row's target tokens, number of target tokens per row).

    Like CausalLMLoss, the head runs only at target positions and in chunks recomputed in backward.
    `ld_alpha` (LD-DPO; rows are chosen answers, then their rejected ones in the same order): a row's target tokens
    past the shorter answer's count of its pair weigh ld_alpha. Counted in target tokens, where LLaMA-Factory counts
    positions from the first target: the same for one answer turn."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    shift_labels = labels[:, 1:]
    targets = shift_labels != IGNORE
    row_of = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(shift_labels)[targets]
    if split is None:
        logits = model(**inputs).logits[:, :-1][targets].float()
        token_logps = -F.cross_entropy(logits, shift_labels[targets], reduction="none")
    else:
        decoder, head = split
        hidden = decoder(**inputs).last_hidden_state[:, :-1][targets]
        token_logps = -chunked_token_losses(hidden, head, shift_labels[targets], chunk_size)
    counts = targets.sum(1)
    if ld_alpha is not None:
        shared = torch.minimum(*counts.chunk(2)).repeat(2)  # each pair's shorter answer, for both of its rows
        rank = (targets.cumsum(1) - 1)[targets]  # each target token's place among its row's targets
        token_logps = token_logps * torch.where(rank < shared[row_of], 1.0, ld_alpha)
    sums = torch.zeros(labels.shape[0], device=labels.device, dtype=torch.float32).index_add(0, row_of, token_logps)
    return sums, counts


@torch.no_grad()
def reference_log_probs(policy, policy_split, reference, input_ids, labels, attention_mask=None):
    """sequence_log_probs of the reference model: `reference` when there is one, else the (LoRA) policy with its
    adapter switched off."""
    if reference is not None:
        return sequence_log_probs(reference, decoder_and_head(reference), input_ids, labels, attention_mask)
    with policy.disable_adapter():
        return sequence_log_probs(policy, policy_split, input_ids, labels, attention_mask)


class CausalLMLoss(torch.nn.Module):
    """A causal LM whose forward returns (loss sum over target tokens, metric sums): the pt/sft loss module.

    It runs the decoder, then applies the output head only at positions that have a target, in chunks, so
    prompt and padding positions never produce full-vocabulary logits. DDP wraps this module, so gradient
    synchronisation sees the whole computation.
    """

    unit = "token"
    extra: dict = {}  # nothing trains besides the model (see steps.LossModule)

    def __init__(self, model, chunk_size: int = 1024, compute_accuracy: bool = False, dft: bool = False,
                 eaft_alpha: float | None = None, router_balance=None, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.compute_accuracy = compute_accuracy  # token accuracy, in evaluation only
        self.dft = dft  # use_dft_loss, in training only
        self.eaft_alpha = eaft_alpha  # use_eaft_loss's exponent, in training only
        self.router_balance = router_balance  # moe.RouterBalance (moe_aux_loss_coef), in training only
        self.label_smoothing = label_smoothing  # HF's label_smoothing_factor, in training and evaluation as there
        self.split = decoder_and_head(model)

    @staticmethod
    def units(batch: dict) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        balance = self.router_balance is not None and self.training
        if balance:
            inputs["output_router_logits"] = True
        if self.split is None:  # output heads with extras: take the model's own logits
            out = self.model(**inputs)
            loss, metrics = self._from_logits(out.logits, labels)
        else:
            out = self.split[0](**inputs)
            loss, metrics = self._from_hidden(out.last_hidden_state, labels)
        if balance:
            # the balancing loss is a mean over the micro-batch, and the loop divides this sum by the step's target
            # tokens: weighted by its share of them, it adds coef x that mean, as transformers adds it to a mean loss
            aux = self.router_balance(out.router_logits, attention_mask)
            units = (labels[:, 1:] != IGNORE).sum()
            loss = loss + self.router_balance.coef * aux * units
            metrics = {**metrics, "aux_loss": aux.detach() * units}
        return loss, metrics

    def _from_logits(self, logits, labels):
        shift_labels = labels[:, 1:]
        targets = shift_labels != IGNORE
        if self.training and (self.dft or self.eaft_alpha is not None):
            wanted_logits = logits[:, :-1][targets].float()
            token_losses = F.cross_entropy(wanted_logits, shift_labels[targets], reduction="none")
            loss = dft_weighted(token_losses) if self.dft else \
                (token_losses * eaft_weights(wanted_logits.detach(), self.eaft_alpha)).sum()
        else:
            loss, _ = token_cross_entropy(logits, labels, self.label_smoothing)
        if self.training or not self.compute_accuracy:  # token accuracy is an evaluation metric
            return loss, {}
        return loss, _example_accuracy((logits[:, :-1].argmax(-1) == shift_labels)[targets], targets)

    def _from_hidden(self, last_hidden, labels):
        head = self.split[1]
        shift_labels = labels[:, 1:]
        targets = shift_labels != IGNORE
        hidden = last_hidden[:, :-1][targets]
        wanted = shift_labels[targets]
        if self.training and self.dft:
            loss = dft_weighted(chunked_token_losses(hidden, head, wanted, self.chunk_size))
        elif self.training and self.eaft_alpha is not None:
            loss = (chunked_token_losses(hidden, head, wanted, self.chunk_size) *
                    head_eaft_weights(hidden, head, self.eaft_alpha, _FROZEN_HEAD_ROWS)).sum()
        else:
            loss = chunked_cross_entropy(hidden, head, wanted, self.chunk_size, self.label_smoothing)
        if self.training or not self.compute_accuracy:  # token accuracy is an evaluation metric
            return loss, {}
        with torch.no_grad():
            correct = torch.cat([head(hidden[s: s + self.chunk_size]).argmax(-1) == wanted[s: s + self.chunk_size]
                                 for s in range(0, hidden.shape[0], self.chunk_size)])
        return loss, _example_accuracy(correct, targets)


def _example_accuracy(correct: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """LLaMA-Factory's eval_accuracy: each example's share of its target tokens predicted right, averaged over the
    examples (steps.metric_means divides by count/accuracy). `correct` holds one flag per True of `targets`."""
    rows = targets.nonzero()[:, 0]
    hits = torch.zeros(targets.shape[0], device=correct.device).index_add_(0, rows, correct.float())
    has = targets.any(1)
    return {"accuracy": (hits[has] / targets.sum(1)[has]).sum(), "count/accuracy": has.sum()}


EAFT_TOP_K = 20  # EAFT's entropy is over the 20 likeliest tokens, its weight that entropy over 3 (about ln 20)


def eaft_weights(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """EAFT (LLaMA-Factory's use_eaft_loss): each row's weight (H / 3) ** alpha, where H is the entropy of its
    softmax renormalised over its 20 largest logits. No gradient: the weight scales a token's loss, and is not
    trained. Confident predictions (low H) weigh little, uncertain ones up to about 1."""
    with torch.no_grad():
        top = logits.float().topk(min(EAFT_TOP_K, logits.shape[-1]), dim=-1).values
        log_probs = top - top.logsumexp(dim=-1, keepdim=True)
        return (-(log_probs.exp() * log_probs).sum(-1) / 3.0) ** alpha


@torch.no_grad()
def head_eaft_weights(hidden: torch.Tensor, head: torch.nn.Module, alpha: float, chunk_size: int) -> torch.Tensor:
    """eaft_weights of head(hidden), `chunk_size` rows at a time: a second, gradient-free pass through the head,
    since the fused cross-entropy keeps no logits. One more head matmul per chunk is within the noise of
    bench/train_speed.py (SmolLM2 LoRA on the Zen 5: 727-774 tokens/s with EAFT, 697-797 without); 128-row chunks
    keep the peak where it was (1.96 GB; 1024-row chunks added 0.17 GB)."""
    return torch.cat([eaft_weights(head(hidden[start: start + chunk_size]), alpha)
                      for start in range(0, hidden.shape[0], chunk_size)]) if len(hidden) else hidden.new_zeros(0)


def dft_weighted(token_losses: torch.Tensor) -> torch.Tensor:
    """DFT (dynamic fine-tuning): the sum of token losses, each weighted by the token's own probability exp(-loss),
    detached so that the weight scales the gradient without being trained (as LLaMA-Factory's use_dft_loss)."""
    return (token_losses * torch.exp(-token_losses).detach()).sum()


def decoder_and_head(model):
    """(decoder, output head) of a causal LM (PEFT-wrapped or not), or None when the head does more than project."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(getattr(base.config, name, None) for name in _HEAD_EXTRAS) or not hasattr(base, "get_decoder"):
        return None
    return base.get_decoder(), base.get_output_embeddings()


# ---- preference losses: each takes per-sequence log-probabilities and returns per-pair losses and rewards ----

def dpo_family_loss(kind: str, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, beta: float, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) for pref_loss sigmoid / hinge / ipo / orpo / simpo.

    `chosen`/`rejected` are the policy's log-probabilities of the answers: summed over tokens for sigmoid and
    hinge, averaged over tokens for ipo, orpo and simpo (the caller passes the right one, see `uses_average`).
    orpo and simpo use no reference model.
    """
    if kind in ("orpo", "simpo"):
        if kind == "orpo":
            # log odds(y) = log p - log(1 - p); ORPO adds the odds-ratio term to the SFT loss on the chosen answer
            log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
            loss = -chosen - beta * F.logsigmoid(log_odds)
        else:
            loss = -F.logsigmoid(beta * (chosen - rejected) - simpo_gamma)
        return loss, beta * chosen.detach(), beta * rejected.detach()
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    if kind == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif kind == "hinge":
        loss = torch.relu(1 - beta * margin)
    elif kind == "ipo":
        loss = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown pref_loss {kind!r}")
    return loss, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def bco_loss(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """BCO's loss per pair (LLaMA-Factory's pref_bco_weight): the implicit rewards beta * (log pi - log pi_ref),
    with gradient, classified against the baseline delta by a logistic loss: chosen above it, rejected below."""
    return -F.logsigmoid(chosen_reward - baseline) - F.logsigmoid(-(rejected_reward - baseline))


def uses_average(kind: str) -> bool:
    """Whether the loss takes length-normalised (per-token average) log-probabilities."""
    return kind in ("ipo", "orpo", "simpo")


def kto_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             policy_kl: torch.Tensor, ref_kl: torch.Tensor, beta: float, chosen_weight: float = 1.0,
             rejected_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses of desirable and undesirable examples concatenated, chosen rewards, rejected rewards).

    The reference point z0 is the batch's KL estimate from mismatched prompt/answer pairs, clamped at 0 and not
    back-propagated, as in the KTO paper.
    """
    z0 = (policy_kl - ref_kl).mean().clamp(min=0).detach()
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = torch.cat([chosen_weight * (1 - torch.sigmoid(beta * (chosen_ratio - z0))),
                        rejected_weight * (1 - torch.sigmoid(beta * (z0 - rejected_ratio)))])
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pairwise_reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


# ---- RL losses: per-token tensors of shape [completions, completion length], `mask` 1 on completion tokens ----

def completion_log_probs(model, split, input_ids, attention_mask, completion_width: int, with_entropy: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probability of each completion token, its entropy or None) for rows laid out as
    [left-padded prompt | completion]; the last `completion_width` columns are the completion."""
    return completion_outputs(model, split, input_ids, attention_mask, completion_width, with_entropy)[:2]


def completion_outputs(model, split, input_ids, attention_mask, completion_width: int, with_entropy: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """completion_log_probs, plus the last hidden states that predict each completion token (for a value head).

    Positions come from the attention mask, as in generation, so left padding does not shift them."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    start = input_ids.shape[1] - completion_width - 1  # the position whose logits predict the first completion token
    if split is not None:  # the head at completion positions only, through head_log_probs
        decoder, head = split
        hidden = decoder(**inputs).last_hidden_state[:, start:-1]
        rows, width = hidden.shape[:2]
        logps, entropy = head_log_probs(hidden.reshape(rows * width, -1), head,
                                        input_ids[:, -completion_width:].reshape(-1), with_entropy)
        return logps.view(rows, width), None if entropy is None else entropy.view(rows, width), hidden
    # output heads that do more than project: the model's own logits
    outputs = model(**inputs, output_hidden_states=True)
    hidden, logits = outputs.hidden_states[-1][:, start:-1], outputs.logits[:, start:-1].float()
    log_probs = logits.log_softmax(-1)
    token_logps = log_probs.gather(-1, input_ids[:, -completion_width:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return token_logps, entropy, hidden


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                        epsilon_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token clipped surrogate loss -min(r A, clip(r, 1 - eps, 1 + eps_high) A), whether the clip was active),
    r = exp(logps - old_logps); `advantages` is per token or per row ([rows, 1])."""
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    unclipped_term, clipped_term = ratio * advantages, clipped * advantages
    return -torch.min(unclipped_term, clipped_term), (clipped_term < unclipped_term)


def kl_to_reference(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3: non-negative, unbiased)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """Each completion's reward minus its group's mean, divided by the group's (scale group) or the whole batch's
    (scale batch) standard deviation + 1e-4, or not divided (scale none). Groups are consecutive rows."""
    groups = rewards.view(-1, group_size)
    centred = (groups - groups.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        return centred / (groups.std(1).repeat_interleave(group_size) + 1e-4)
    if scale == "batch":
        return centred / (rewards.std() + 1e-4)
    return centred


def token_weights(loss_type: str, mask: torch.Tensor, max_completion_length: int) -> torch.Tensor:
    """Per-token weights that turn token losses into the micro-batch's loss sum, to be divided by
    `loss_units(loss_type, mask)` summed over the step:
    grpo: 1 / own length (then mean over completions); dr_grpo: 1 / max_completion_length (then mean over
    completions); dapo: 1 (then divided by all completion tokens of the step); bnpo: 1 / this micro-batch's
    completion tokens (then mean over micro-batches)."""
    mask = mask.float()
    if loss_type == "grpo":
        return mask / mask.sum(1, keepdim=True).clamp(min=1)
    if loss_type == "dr_grpo":
        return mask / max_completion_length
    if loss_type == "dapo":
        return mask
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def loss_units(loss_type: str, mask: torch.Tensor) -> torch.Tensor:
    """What a micro-batch adds to the step's denominator (see token_weights)."""
    if loss_type == "dapo":
        return mask.sum()
    if loss_type == "bnpo":
        return torch.tensor(1)
    return torch.tensor(mask.shape[0])


# ---- PPO (TRL's PPOTrainer formulas, which LLaMA-Factory's PPO runs): per-token tensors [rows, completion width] ----

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries (unbiased variance, as TRL); shift_mean=False adds the mean
    back, so only the spread changes."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask) * count / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalised_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards: -kl_coef x (logp - ref_logp) at every completion token, plus the score at the last one;
    the per-token KL logp - ref_logp). Completions start at column 0 and are padded on the right."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores
    return rewards, kl


def generalised_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(GAE advantages, returns = advantages + values). After a completion's last token the value is 0."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token 0.5 x max((v - R)^2, (clip(v, v_old +- clip) - R)^2), whether the clipped term was larger)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss


def adaptive_kl_coef(coef: float, kl: float, target: float, n_steps: int, horizon: int = 10000) -> float:
    """TRL's AdaptiveKLController (Ziegler et al. 2019): move the KL coefficient towards `target` KL, by at most
    20% of n_steps / horizon per update."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return coef * (1 + error * n_steps / horizon)
