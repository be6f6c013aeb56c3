"""DPO (Rafailov et al. 2023) for either family: `train.objective: dpo` over manifest pairs.

Each manifest row holds a prompt (its clip) and two answers, `chosen` and `rejected`. The
reference model is the model as it starts: its log-probabilities of every pair are computed once,
before the first step (it never changes), as a frozen encoder's outputs are. A batch of pairs is
`{"chosen": batch, "rejected": batch, "ref_chosen": (B,), "ref_rejected": (B,)}`, each half a
batch of the family's own batcher; the family's `labelled_logits` score the answers.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..data.dataset import length_grouped_batches
from .family import Family


class PreferenceBatcher:
    """DPO batches for the listening family: each clip with its chosen and its rejected answer."""

    def __init__(self, batcher, family: Family, model, batch_size: int, desc: str):
        self.batcher, self.dataset = batcher, batcher.dataset
        check_pairs(self.dataset.utterances)
        self.reference = reference_logprobs(family, model, self._pair, self.lengths(), batch_size, desc)

    def lengths(self) -> list[float]:
        return self.dataset.lengths()

    def _pair(self, idx):
        utts = [self.dataset.utterance(i) for i in idx]
        return self.batcher(idx, [u.chosen for u in utts]), self.batcher(idx, [u.rejected for u in utts])

    def __call__(self, idx: list[int]) -> dict:
        return preference_batch(self._pair(idx), self.reference, idx)


def check_pairs(utterances: list) -> None:
    """DPO needs a chosen and a rejected answer on every manifest row."""
    missing = [u.id or u.audio for u in utterances if not (u.chosen and u.rejected)]
    if missing:
        from ..data.manifest import ManifestError

        raise ManifestError(f"train.objective=dpo needs chosen and rejected answers on every manifest row; missing on {missing[:3]}")


@torch.no_grad()
def reference_logprobs(family: Family, model, pair: Callable, lengths: list[float], batch_size: int,
                       desc: str) -> dict[int, tuple[float, float]]:
    """Each pair's (chosen, rejected) log-probability under `model` as it is now: DPO's reference,
    computed once. `pair(idx)` gives the two batches of those pairs."""
    reference = {}
    was_training = model.training
    model.eval()
    for idx in tqdm(length_grouped_batches(lengths, batch_size, seed=0, shuffle=False), desc=desc, unit="batch", leave=False):
        c, r = pair(idx)
        lc, lr = sequence_logprobs(family, model, c), sequence_logprobs(family, model, r)
        for j, i in enumerate(idx):
            reference[i] = (float(lc[j]), float(lr[j]))
    if was_training:
        family.train_mode(model)
    return reference


def preference_batch(pair: tuple[dict, dict], reference: dict, idx: list[int]) -> dict:
    ref = torch.tensor([reference[i] for i in idx], dtype=torch.float32)
    return {"chosen": pair[0], "rejected": pair[1], "ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}


def sequence_logprobs(family: Family, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) summed log-probability of each row's labelled tokens (its answer), from the logits at
    labelled positions only (the family's `labelled_logits`, as its training loss uses)."""
    logits, targets, rows = family.labelled_logits(model, batch)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    return torch.zeros(batch["labels"].shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def dpo_loss(family: Family, model, batch: dict, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta * (policy margin - reference margin)), and the mean reward margin."""
    pc, pr = sequence_logprobs(family, model, batch["chosen"]), sequence_logprobs(family, model, batch["rejected"])
    margin = (pc - batch["ref_chosen"].to(pc.device)) - (pr - batch["ref_rejected"].to(pr.device))
    return -torch.nn.functional.logsigmoid(beta * margin).mean(), (beta * margin).detach().mean()


@torch.no_grad()
def evaluate_dpo(family: Family, model, batcher, batch_size: int, beta: float, amp, runner=None) -> float:
    """Mean DPO loss over the eval pairs; through `runner` (FSDP) when given."""
    model.eval()
    losses = []
    for idx in length_grouped_batches(batcher.lengths(), batch_size, seed=0, shuffle=False):
        with amp:
            loss = (runner if runner is not None else lambda b: dpo_loss(family, model, b, beta))(batcher(idx))[0]
        losses += [float(loss)] * len(idx)
    family.train_mode(model)
    return sum(losses) / max(len(losses), 1)
