"""MrT5 delete gate, hard deletion and PI controller (bytelm.models.gates), against independent
computations."""

from __future__ import annotations

import math

import pytest
import torch

from bytelm.models.gates import DeleteGate, PIController, deleted_mask, gate_stats, hard_delete, masked_mean

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gate_formula_matches_independent_computation():
    torch.manual_seed(0)
    D = 24
    gate = DeleteGate(D, k=-30.0, bias_init=1.0)
    with torch.no_grad():
        gate.norm.weight.uniform_(0.5, 1.5)
        gate.proj.bias.fill_(0.3)
    h = torch.randn(3, 7, D, dtype=torch.float64).float() * 3
    pad = torch.ones(3, 7, dtype=torch.bool)
    pad[1, 5:] = False
    G = gate(h, pad)
    # independent: G = k * sigmoid(-(RMSNorm(h) @ w + b)), written out in float64
    hd = h.double()
    rms = torch.sqrt(hd.pow(2).mean(-1, keepdim=True) + gate.norm.eps)
    n = hd / rms * gate.norm.weight.double()
    s = n @ gate.proj.weight.double().squeeze(0) + gate.proj.bias.double()
    expect = -30.0 / (1.0 + torch.exp(s))  # k * sigmoid(-s)
    expect[~pad] = -30.0
    assert G.shape == (3, 7)
    torch.testing.assert_close(G.double(), expect, atol=1e-4, rtol=1e-5)
    assert (G[1, 5:] == -30.0).all(), "padding must be forced to k"
    assert ((G > -30.0) & (G < 0.0))[pad].all()


def test_gate_init_near_minus_8_and_measured_kept_ratio():
    torch.manual_seed(0)
    D = 256
    gate = DeleteGate(D)
    assert torch.allclose(gate.proj.bias, torch.tensor([1.0]))
    bound = math.sqrt(6.0 / (D + 1))  # xavier uniform on a (1, D) weight
    assert gate.proj.weight.abs().max() <= bound
    h = torch.randn(4, 2048, D)
    with torch.no_grad():
        G = gate(h)
    g0 = -30.0 * (1 / (1 + math.exp(1.0)))  # -30 * sigmoid(-1) = -8.07
    assert abs(float(G.median()) - g0) < 0.6, float(G.median())
    # the xavier projection spreads RMSNorm(h) @ w with variance ~ 2 D/(D+1) ~ 2, so a share of positions
    # is already below tau_del at init: P(N(1, 2) < 0) = Phi(-1/sqrt(2)) = 0.24. Measured, not assumed 0.
    ratio = float(gate_stats(G, -15.0)["deletion_ratio"])
    w2 = float(gate.proj.weight.detach().pow(2).sum())
    expect = 0.5 * (1 + math.erf((-1.0 / math.sqrt(w2)) / math.sqrt(2)))
    assert abs(ratio - expect) < 0.03, (ratio, expect)
    assert 0.1 < ratio < 0.4


def _hard_delete_reference(h, G, tau, pad):
    B = h.shape[0]
    kept = [[t for t in range(h.shape[1]) if G[b, t] > tau and pad[b, t]] for b in range(B)]
    return kept


def test_hard_delete_matches_loop_reference():
    torch.manual_seed(1)
    B, T, D = 4, 13, 5
    h = torch.randn(B, T, D)
    G = torch.empty(B, T).uniform_(-30, 0)
    G[2] = -29.0  # a row with nothing kept
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, 9:] = False
    G[1, 10] = -1.0  # kept by G, but padding
    out, mask, idx = hard_delete(h, G, -15.0, pad)
    ref = _hard_delete_reference(h, G, -15.0, pad)
    t_new = max(1, max(len(r) for r in ref))
    assert out.shape == (B, t_new, D) and mask.shape == (B, t_new) and idx.shape == (B, t_new)
    for b in range(B):
        n = len(ref[b])
        assert int(mask[b].sum()) == n and mask[b, :n].all()
        assert idx[b, :n].tolist() == ref[b]  # original order
        torch.testing.assert_close(out[b, :n], h[b, ref[b]])
    assert not mask[2].any()


def test_deleted_mask_and_stats():
    G = torch.tensor([[-20.0, -1.0, -16.0, -30.0], [-2.0, -3.0, -15.5, -30.0]])
    pad = torch.tensor([[True, True, True, False], [True, True, True, True]])
    d = deleted_mask(G, -15.0, pad)
    assert d.tolist() == [[True, False, True, False], [False, False, True, True]]
    st = gate_stats(G, -15.0, pad, alpha=0.25)
    assert float(st["deletion_ratio"]) == pytest.approx(4 / 7)
    assert float(st["kept_ratio"]) == pytest.approx(3 / 7)
    assert float(st["bytes_kept_per_seq"]) == pytest.approx((1 + 2) / 2)
    assert float(st["alpha"]) == pytest.approx(0.25)
    assert float(st["gate_mean"]) == pytest.approx((-20 - 1 - 16 - 2 - 3 - 15.5 - 30) / 7)
    assert float(masked_mean(G, pad)) == pytest.approx(float(st["gate_mean"]))


def test_pi_controller_hand_computed_sequence():
    delta, kp, ki = 0.5, 0.5, 1e-5
    ctl = PIController(delta, kp, ki)
    ratios = [0.1, 0.3, 0.95, 0.9, 0.5, 0.2]
    p = i = 0.0
    expected = []
    for r in ratios:
        err = delta - r
        p = 0.9 * p + 0.1 * kp * err
        i = i + ki * err
        expected.append(max(0.0, p + i))
    got = [float(ctl.update(r)) for r in ratios]
    assert got == pytest.approx(expected, abs=1e-7)
    # hand check of the first two: 0.1*0.5*0.4 + 1e-5*0.4 = 0.020004;
    # 0.9*0.02 + 0.1*0.5*0.2 + 1e-5*0.6 = 0.028006
    assert got[0] == pytest.approx(0.020004, abs=1e-7)
    assert got[1] == pytest.approx(0.028006, abs=1e-7)
    assert got[3] == 0.0  # clamped: p + i < 0 after the overshoot
    assert int(ctl.steps) == len(ratios)


def test_pi_controller_state_dict_round_trip_and_dtype():
    a = PIController(0.6)
    for r in (0.1, 0.2, 0.9):
        a.update(r)
    sd = a.state_dict()
    assert set(sd) == {"p", "i", "alpha", "steps"}
    b = PIController(0.6)
    b.load_state_dict(sd)
    for name in ("p", "i", "alpha", "steps"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert float(a.update(0.3)) == float(b.update(0.3))
    b.to(torch.bfloat16)  # a bf16 cast of the model must not round the controller state
    assert b.i.dtype == b.p.dtype == b.alpha.dtype == torch.float32


@pytest.mark.parametrize("delta", [0.3, 0.75])
def test_pi_controller_drives_toy_run_to_target(delta):
    """Closed loop: real DeleteGate + PIController + Adam on a synthetic task that makes keeping worth
    something (deleting position j costs c * imp_j * G_j / k, importance imp ~ U(0, 1) readable from h).
    Without the regulariser nothing is deleted; the controller must raise alpha until the deletion ratio
    sits at delta (P control leaves an error of about alpha*/kp = 2 c delta / 30; c = 0.5 keeps it < 3
    pts)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    D, N, c = 16, 512, 0.5
    u, v = torch.randn(2, D, generator=g)
    gate = DeleteGate(D)
    ctl = PIController(delta)
    opt = torch.optim.Adam(gate.parameters(), lr=5e-3)
    hist = []
    for _ in range(300):
        imp = torch.rand(1, N, 1, generator=g)
        h = imp * u + (1 - imp) * v + 0.05 * torch.randn(1, N, D, generator=g)
        G = gate(h)  # (1, N)
        alpha = ctl.alpha.clone()  # set by the previous step
        loss = c * (imp.squeeze(-1) * G / gate.k).mean() + alpha * G.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        r = gate_stats(G, -15.0)["deletion_ratio"]
        ctl.update(r)
        hist.append(float(r))
    final = sum(hist[-50:]) / 50
    print(f"delta={delta}: deletion ratio over the last 50 of 300 steps = {final:.3f}")
    assert abs(final - delta) < 0.1, (final, delta)  # from ~0 deletion; measured within 0.02 (P offset)
    assert float(ctl.alpha) > 0 or final >= delta


def test_centered_gate_ignores_the_component_shared_by_a_row():
    """``center=True``: the gate reads ``h - mean_t h`` over the row's real positions, so adding one vector to
    every real position of a row changes nothing, padding does not enter the mean, and the formula is the
    uncentred gate applied to the centred input."""
    torch.manual_seed(0)
    D = 16
    gate = DeleteGate(D, center=True)
    plain = DeleteGate(D)
    plain.load_state_dict(gate.state_dict())
    h = torch.randn(2, 9, D)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, 6:] = False
    G = gate(h, pad)
    shifted = h + 25.0 * torch.randn(2, 1, D)  # a large shared component per row
    shifted[1, 6:] = torch.randn(3, D) * 100  # padding content is irrelevant
    torch.testing.assert_close(gate(shifted, pad), G, atol=1e-4, rtol=1e-4)
    mu = torch.stack([h[0].mean(0), h[1, :6].mean(0)]).unsqueeze(1)  # (2, 1, D)
    torch.testing.assert_close(G, plain(h - mu, pad), atol=1e-5, rtol=1e-5)
    assert (G[1, 6:] == gate.k).all()
    # an uncentred gate is dominated by the shared component: nearly one value per row
    big = plain(shifted, pad)
    assert float(big[0].std()) < 0.2 * float(G[0].std())


def test_two_sided_controller():
    """``alpha_min < 0``: a ratio above delta drives alpha negative (rewarding kept bytes); the paper's
    controller (alpha_min = 0) stops at 0."""
    paper, two = PIController(0.5), PIController(0.5, alpha_min=-1.0)
    for _ in range(30):
        a_paper, a_two = float(paper.update(0.9)), float(two.update(0.9))
    assert a_paper == 0.0
    # p -> kp * err = -0.2 geometrically, i = 30 * ki * err
    expect = -0.2 * (1 - 0.9**30) + 30 * 1e-5 * -0.4
    assert a_two == pytest.approx(expect, abs=1e-6)
