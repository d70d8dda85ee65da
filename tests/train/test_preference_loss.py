"""DPO / ORPO losses, rewards and gradients against float64 re-implementations of the papers' formulas and TRL.

Tolerance 1e-5 (absolute and relative): the fp32 losses of a handful of pairs with log-probs of order 100
round at ~1e-6; the float64 references are exact to far below that.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qlorakit.config import LoraConfig
from qlorakit.train.preference import (
    dpo_loss,
    log1mexp,
    odds_ratio_loss,
    reference_token_logps,
    sequence_logps,
    token_logps,
)
from tests.helpers.train import tiny_qlora_model

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _logps(seed: int, n: int = 6, scale: float = 40.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * scale + 1.0) for _ in range(4)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_rewards_and_gradients_equal_the_paper_formula_in_float64():
    beta = 0.1
    pc, pr, rc, rr = _logps(1)
    expected_loss, expected_grad_c, expected_grad_r, n = 0.0, [], [], len(pc)
    for i in range(n):  # eq. 7 of Rafailov et al., written out per pair in float64 scalars
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expected_loss += -math.log(_sigmoid(beta * h)) / n
        expected_grad_c.append(-beta * _sigmoid(-beta * h) / n)  # d mean(loss) / d log pi(y_w)
        expected_grad_r.append(beta * _sigmoid(-beta * h) / n)
    policy_c = pc.float().requires_grad_(True)
    policy_r = pr.float().requires_grad_(True)
    losses, r_w, r_l = dpo_loss(policy_c, policy_r, rc.float(), rr.float(), beta)
    losses.mean().backward()
    assert losses.mean().item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(r_w.double(), beta * (pc - rc), **TOL)
    torch.testing.assert_close(r_l.double(), beta * (pr - rr), **TOL)
    torch.testing.assert_close(policy_c.grad.double(), torch.tensor(expected_grad_c, dtype=torch.float64), **TOL)
    torch.testing.assert_close(policy_r.grad.double(), torch.tensor(expected_grad_r, dtype=torch.float64), **TOL)


def _orpo_reference(avg_c: float, avg_r: float, beta: float) -> tuple[float, float, float, float]:
    """Hong et al. eqs. 4-7 in float64: (lambda * L_OR, log-odds difference, dL/d avg_c, dL/d avg_r)."""
    def odds(a: float) -> float:
        return math.exp(a) / (1.0 - math.exp(a))

    log_odds = math.log(odds(avg_c) / odds(avg_r))
    loss = -beta * math.log(_sigmoid(log_odds))
    # d log odds(a) / d a = 1 + e^a / (1 - e^a) = 1 / (1 - e^a)
    common = -beta * _sigmoid(-log_odds)
    return loss, log_odds, common / (1.0 - math.exp(avg_c)), -common / (1.0 - math.exp(avg_r))


@pytest.mark.parametrize("scale", [3.0, 0.6])  # mean log-probs around -2 and around -0.3 (both log1mexp branches)
def test_odds_ratio_loss_and_gradients_equal_the_paper_formula_in_float64(scale):
    beta = 0.25
    ac, ar, _, _ = (x / 40.0 * scale for x in _logps(2))
    avg_c, avg_r = ac.float().requires_grad_(True), ar.float().requires_grad_(True)
    losses, log_odds, r_w, r_l = odds_ratio_loss(avg_c, avg_r, beta)
    losses.sum().backward()
    for i in range(len(ac)):
        loss, lo, grad_c, grad_r = _orpo_reference(ac[i].item(), ar[i].item(), beta)
        assert losses[i].item() == pytest.approx(loss, rel=1e-5, abs=1e-5)
        assert log_odds[i].item() == pytest.approx(lo, rel=1e-5, abs=1e-5)
        assert avg_c.grad[i].item() == pytest.approx(grad_c, rel=1e-5, abs=1e-5)
        assert avg_r.grad[i].item() == pytest.approx(grad_r, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(r_w.double(), beta * ac, **TOL)
    torch.testing.assert_close(r_l.double(), beta * ar, **TOL)


def test_log1mexp_is_accurate_on_both_sides_of_minus_ln2():
    a = torch.tensor([-1e-7, -1e-3, -0.5, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    expected = torch.tensor([math.log(-math.expm1(x)) for x in a.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(a.float()).double(), expected, rtol=1e-6, atol=1e-6)


def test_odds_ratio_loss_equals_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    beta = 0.1
    ac, ar, _, _ = (x / 20.0 for x in _logps(3))
    stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_w, trl_l, trl_ratio, trl_log_odds = orpo.ORPOTrainer.odds_ratio_loss(stub, ac.float(), ar.float())
    losses, log_odds, r_w, r_l = odds_ratio_loss(ac.float(), ar.float(), beta)
    torch.testing.assert_close(losses, -trl_losses, **TOL)  # TRL returns beta * log sigmoid, subtracted from the NLL
    torch.testing.assert_close(log_odds.mean(), trl_log_odds, **TOL)
    torch.testing.assert_close(torch.nn.functional.logsigmoid(log_odds).mean(), trl_ratio, **TOL)
    torch.testing.assert_close(r_w, trl_w, **TOL)
    torch.testing.assert_close(r_l, trl_l, **TOL)


def _tiny_batch(vocab: int = 64, rows: int = 4, width: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[1, 9:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("chunk", [3, 256])
def test_chunked_token_logps_equal_the_full_logits_reference_with_gradients(chunk):
    model = tiny_qlora_model(64, LoraConfig(r=4, alpha=8, dropout=0.0, init="gaussian"))
    for layer_b in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(layer_b, std=0.02)  # non-zero B, so the adapters change the logits
    batch = _tiny_batch()
    grads = []
    for fn in (lambda: reference_token_logps(model, batch), lambda: token_logps(model, batch, chunk)):
        model.zero_grad()
        values, rows = fn()
        (values * torch.linspace(0.5, 1.5, values.shape[0])).sum().backward()  # a weighted sum: per-row grads
        grads.append((values.detach(), rows, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (ref, ref_rows, ref_grads), (fast, fast_rows, fast_grads) = grads
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast_rows, ref_rows)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sequence_logps_equal_trl_get_batch_logps():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    model = tiny_qlora_model(64, LoraConfig(r=4, alpha=8, dropout=0.0))
    batch = _tiny_batch()
    with torch.no_grad():
        sums, counts = sequence_logps(model, batch, chunk_tokens=5)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trl_sum = orpo.ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=False)
        trl_avg = orpo.ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    torch.testing.assert_close(sums, trl_sum, **TOL)
    torch.testing.assert_close(sums / counts, trl_avg, **TOL)


def test_auto_reference_picks_the_mode_with_fewer_reference_forwards():
    from qlorakit.config import EvalConfig, RunConfig, TrainConfig
    from qlorakit.train.objective import choose_reference

    short = RunConfig(train=TrainConfig(max_steps=16, batch_size=4, grad_accum=1))  # 64 pairs visited
    assert choose_reference(short, 128, 32)[0] == "same-step"  # 64 + 2 x 32 = 128 < 160
    long = RunConfig(train=TrainConfig(epochs=2, batch_size=4, grad_accum=1), eval=EvalConfig(eval_steps=16))
    choice, note = choose_reference(long, 128, 32)  # 64 steps x 4 + 5 evaluations x 32 = 416 > 160
    assert choice == "cached" and "64 steps x 4 pairs + 5 evaluations x 32" in note


class _Gather:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics


def test_dpo_loss_rewards_and_gradients_equal_trl_dpo_trainer():
    """TRL 1.16 has no DPO loss function of log-probs: its ``DPOTrainer._compute_loss`` runs on a stub trainer
    and a stub model that returns the per-token log-probs (``precompute_ref_logps`` gives the reference)."""
    from collections import defaultdict

    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    beta, pairs, width = 0.1, 3, 7
    g = torch.Generator().manual_seed(11)
    token_logps = -torch.rand(2 * pairs, width - 1, generator=g, dtype=torch.float64).float() * 3  # (2B, T-1)
    completion = torch.zeros(2 * pairs, width, dtype=torch.long)
    completion[:, 3:] = 1
    completion[1, 5:] = 0  # a shorter completion
    shift = completion[:, 1:].float()  # (2B, T-1)
    ref = -torch.rand(2 * pairs, generator=g) * 10
    leaf = token_logps.clone().requires_grad_(True)

    def fake_model(**kwargs):
        zeros = torch.zeros_like(leaf)
        return SimpleNamespace(log_probs=leaf * shift, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    fake_model.training = True
    stub = SimpleNamespace(model=fake_model, accelerator=_Gather(), aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                           loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * pairs, width, dtype=torch.long),
              "attention_mask": torch.ones_like(completion), "completion_mask": completion,
              "ref_chosen_logps": ref[:pairs], "ref_rejected_logps": ref[pairs:]}
    trl_loss = trl_dpo.DPOTrainer._compute_loss(stub, fake_model, inputs, return_outputs=False)
    trl_loss.backward()
    trl_grad, leaf.grad = leaf.grad.clone(), None
    sums = (leaf * shift).sum(1)  # (2B,)
    losses, r_w, r_l = dpo_loss(sums[:pairs], sums[pairs:], ref[:pairs], ref[pairs:], beta)
    losses.mean().backward()
    torch.testing.assert_close(losses.mean(), trl_loss, **TOL)
    torch.testing.assert_close(leaf.grad, trl_grad, **TOL)
    metrics = stub._metrics["train"]
    for name, ours in (("rewards/chosen", r_w.mean()), ("rewards/rejected", r_l.mean()),
                       ("rewards/margins", (r_w - r_l).mean()), ("rewards/accuracies", (r_w > r_l).float().mean())):
        assert metrics[name][-1] == pytest.approx(float(ours), rel=1e-5, abs=1e-6), name
