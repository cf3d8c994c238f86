"""``inhibition="memel"`` against a small re-implementation of the official MEmeL procedure.

The re-implementation is written from the MEmeL paper (KDD'24: Sec. 3's score with variance
compensation, Lemma 3.2's merge with forgetting after n_f batches, Reverse Deactivation; App. E.3:
"only the most monosemantic neuron is selected and deactivated for each sample"), in float64, one
statistic per (position, channel) as the official code keeps them. It scores a batch against the
statistics of the batches before it (the library's order; see docs/algorithm.md, "memel and the
official code", for the official code's order and the other remaining differences), then merges it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from conftest import batches
from l2e_optim._lab.zoo import tiny_gpt_neox
from l2e_optim import L2EConfig, L2EWrapper

N_F, EPS, DELTA, TOPK = 3, 0.01, 0.5, 1


class PaperMemel:
    """MEmeL on ``h`` ``[batch, positions, channels]``: statistics per (position, channel)."""

    def __init__(self) -> None:
        self.count = 0  # values merged into each (position, channel) statistic
        self.mean = torch.zeros(())
        self.var = torch.zeros(())

    def __call__(self, h: Tensor, active: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Reverse Deactivation's forward values, d(out)/dh, and the mask; then merge ``h``."""
        h = h.double()
        chosen = torch.zeros_like(h, dtype=torch.bool)
        if self.count > 0 and active:
            phi = (h - self.mean) ** 2 / (self.var + EPS * self.var.mean())
            for b in range(h.shape[0]):  # each sample: its k highest scores over positions x channels
                order = torch.argsort(phi[b].flatten(), descending=True)[:TOPK]
                chosen[b].view(-1)[order] = True
        out = torch.where(chosen, self.mean, h)  # (1 - m(1+D)) h + m (mean + D sg(h)), forward
        slope = torch.where(chosen, -DELTA, 1.0)  # ... and its derivative in h
        self.merge(h)
        return out, slope, chosen

    def merge(self, h: Tensor) -> None:
        b = h.shape[0]
        batch_mean, batch_var = h.mean(0), h.var(0, unbiased=False)
        if self.count == 0:
            self.mean, self.var = batch_mean, h.var(0, unbiased=True)
            self.count = b
            return
        m = min(self.count, N_F * b)  # forgetting: the history weighs at most n_f batches
        total = m + b
        between = m * b * (self.mean - batch_mean) ** 2 / ((total - 1) * total)
        self.var = between + (b * batch_var + (m - 1) * self.var) / (total - 1)
        self.mean = (m * self.mean + b * batch_mean) / total
        self.count += b


def test_memel_matches_the_paper_procedure_on_the_same_stream(corpus: Tensor) -> None:
    seq = 10
    model = tiny_gpt_neox(layers=2)
    config = L2EConfig(inhibition="memel", statistics="per-position", max_positions=seq, forget_steps=N_F,
                       warmup_steps=N_F, memel_scale=DELTA, memel_topk=TOPK, layers=(1,))
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.05), model, config=config)
    (name, site), = opt.sites.items()
    module = dict(model.named_modules())[name]
    seen: dict[str, Tensor] = {}

    def keep(key: str) -> object:
        def hook(m: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen[key] = args[0]
            args[0].register_hook(lambda g: seen.__setitem__(f"grad_{key}", g))
        return hook

    module.register_forward_pre_hook(keep("in"), prepend=True)
    module.register_forward_pre_hook(keep("out"))
    paper = PaperMemel()
    data = batches(corpus, 3, seq)
    inhibited = 0
    for step in range(3 * N_F):
        ids = next(data)
        model(input_ids=ids, labels=ids).loss.backward()
        out, slope, chosen = paper(seen["in"].detach(), active=step >= N_F)  # the official warm-up: n_f batches
        changed = seen["in"].detach() != seen["out"].detach()
        assert torch.equal(changed, chosen), step
        torch.testing.assert_close(seen["out"].detach().double(), out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen["grad_in"].double(), seen["grad_out"].double() * slope)
        inhibited += int(chosen.sum())
        opt.step()
        opt.zero_grad()
    assert inhibited == 2 * N_F * 3 * TOPK  # one value per sequence on every step after warm-up
    torch.testing.assert_close(site.mean[:seq].double(), paper.mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(site.var[:seq].double(), paper.var, rtol=1e-3, atol=1e-7)
