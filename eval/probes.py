"""Linear probes fit the way SAEBench fits them, so the scores built on them (absorption, sparse
probing) mean what SAEBench's mean.

SAEBench uses two fits. Its own `train_multi_probe`: one-vs-rest logistic probes by minibatch
Adam on raw inputs, positives up-weighted by negatives / positives, L2 as Adam's weight decay, the
learning rate decayed exponentially per epoch, an optional L1 term on the weights. And
scikit-learn's `LogisticRegression(class_weight="balanced")` for its k-sparse probes: an
L2-regularised logistic regression solved to its optimum, which is unique, so `logistic_regression`
below (Newton's method, many small problems at once) reaches the same weights without depending
on scikit-learn. The minibatch fit depends on its random draws (initialisation, shuffles); those
are drawn as SAEBench draws them, so the same seed gives the same probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sae.hooks import capture
from sae.models import SAE


def last_token_activations(
    model: nn.Module, rows: list[list[int]], hook: str, batch_size: int
) -> Tensor:
    """The activation at `hook` on each token-id row's last token [len(rows), d], float32 on the CPU.

    Rows run in order of length, `batch_size` at a time, right-padded to the longest in the batch
    (the causal mask keeps padding out of earlier positions, the attention mask out of the rest),
    so prompts of one length, as most of a probing set's are, share unpadded batches."""
    if not rows:
        raise ValueError("no prompts to run")
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: Tensor | None = None
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        lengths = torch.tensor([len(rows[i]) for i in batch])
        tokens = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
        mask = torch.arange(tokens.shape[1]) < lengths[:, None]
        tokens[mask] = torch.tensor([t for i in batch for t in rows[i]])
        acts = capture(model, [hook], input_ids=tokens.to(device), attention_mask=mask.to(device))
        last = acts[hook][torch.arange(len(batch)), lengths.to(acts[hook].device) - 1]
        if out is None:
            out = torch.empty(len(rows), last.shape[-1])
        out[batch] = last.float().cpu()
    return out


@torch.no_grad()
def encode_rows(sae: SAE, x: Tensor, batch_size: int = 1024) -> Tensor:
    """The SAE's codes for rows x [n, d_in], float32 on the CPU, batch_size rows at a time."""
    device = sae.W_enc.device
    return torch.cat([sae.encode(b.to(device)).float().cpu() for b in x.split(batch_size)])


@dataclass
class ProbeFit:
    """SAEBench's settings for `train_multi_probe` (those of its first-letter LM probe)."""

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-2
    end_lr: float = 1e-5
    weight_decay: float = 1e-4
    l1: float = 0.0
    """L1 weight on the sum of |w| per probe, averaged over probes."""


def train_probes(
    x: Tensor, y: Tensor, fit: ProbeFit, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes on x [n, f] for labels y [n, P]: weights [P, f], biases [P].

    The random draws are SAEBench's, taken from `generator` in the order SAEBench takes them from
    torch's global generator: `nn.Linear`'s initialisation, then per epoch what a shuffling
    `DataLoader` draws. So `generator` seeded as SAEBench seeds torch gives SAEBench's probe."""
    n, f = x.shape
    w = torch.empty(y.shape[1], f)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
    b = torch.empty(y.shape[1]).uniform_(-1 / math.sqrt(f), 1 / math.sqrt(f), generator=generator)
    w.requires_grad_(), b.requires_grad_()
    y = y.to(x.dtype)
    positives = y.sum(0)
    pos_weight = (n - positives) / positives
    opt = torch.optim.Adam([w, b], lr=fit.lr, weight_decay=fit.weight_decay)
    decay = torch.optim.lr_scheduler.ExponentialLR(
        opt, gamma=math.exp(math.log(fit.end_lr / fit.lr) / fit.epochs)
    )
    with torch.enable_grad():
        for _ in range(fit.epochs):
            for rows in shuffle(n, generator).split(fit.batch_size):
                logits = torch.addmm(b, x[rows], w.T)
                loss = F.binary_cross_entropy_with_logits(logits, y[rows], pos_weight=pos_weight)
                if fit.l1:
                    loss = loss + fit.l1 * w.abs().sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            decay.step()
    return w.detach(), b.detach()


def shuffle(n: int, generator: torch.Generator) -> Tensor:
    """An epoch's order as a shuffling DataLoader without a generator of its own draws it: its
    base seed (unused without workers), then its sampler's seed, which seeds the permutation."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def logistic_regression(
    x: Tensor, y: Tensor, c: float = 1.0, steps: int = 100, tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Class-balanced L2 logistic regressions, one per problem: x [P, n, f], y [P, n] boolean;
    returns weights [P, f] and biases [P] (float64).

    Minimises ||w||² / 2 + c Σ_i s_i log(1 + exp(-±(w·x_i + b))), with s_i = n / (2 n_class(i)) and
    the bias unpenalised: scikit-learn's LogisticRegression(C=c, class_weight="balanced").
    Damped Newton steps; the problems are small (f <= a few dozen) and strictly convex."""
    x, y = x.double(), y.double()
    p, n, f = x.shape
    xb = torch.cat([x, torch.ones(p, n, 1, dtype=x.dtype)], -1)  # bias as a last feature
    pos = y.sum(1, keepdim=True)
    weight = c * torch.where(y > 0, n / (2 * pos), n / (2 * (n - pos)))  # [P, n]
    penalty = torch.ones(f + 1, dtype=x.dtype)
    penalty[-1] = 0.0

    def objective(theta: Tensor) -> Tensor:
        logits = torch.einsum("pnf,pf->pn", xb, theta)
        loss = F.binary_cross_entropy_with_logits(logits, y, weight=weight, reduction="none")
        return loss.sum(1) + 0.5 * (penalty * theta**2).sum(1)

    theta = torch.zeros(p, f + 1, dtype=x.dtype)
    current = objective(theta)
    for _ in range(steps):
        prob = torch.sigmoid(torch.einsum("pnf,pf->pn", xb, theta))
        grad = torch.einsum("pnf,pn->pf", xb, weight * (prob - y)) + penalty * theta
        hess = torch.einsum("pnf,pn,png->pfg", xb, weight * prob * (1 - prob), xb)
        hess = hess + torch.diag_embed(penalty.expand(p, -1))
        step = torch.linalg.solve(hess, grad)
        t = torch.ones(p, 1, dtype=x.dtype)
        for _ in range(30):  # halve each problem's step until its objective does not rise
            worse = objective(theta - t * step) > current
            if not worse.any():
                break
            t = torch.where(worse[:, None], t / 2, t)
        else:
            t = torch.where(worse[:, None], 0.0, t)  # at its optimum to rounding: stay
        theta = theta - t * step
        current = objective(theta)
        if (t * step).abs().max() < tol:
            break
    return theta[:, :-1], theta[:, -1]


def f1(pred: Tensor, y: Tensor) -> Tensor:
    """F1 per column of boolean predictions and labels [n, P] (0 where nothing is predicted or
    true, as scikit-learn reports it)."""
    tp = (pred & y).sum(0).double()
    return 2 * tp / (pred.sum(0) + y.sum(0)).double().clamp_min(1)
