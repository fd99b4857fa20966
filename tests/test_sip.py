"""VEN-VL SIP (eqs. 9-12) and FSQ (Mentzer et al. 2023): FSQ equals its definition, propagation equals its equations
computed directly, the SIP loss in a real pruned forward equals a per-sample recomputation, and it trains."""
import math

import pytest
import torch
import torch.nn.functional as F

import compactvl.policies.hte  # noqa: F401  (registers hte)
from compactvl.errors import ConfigError
from compactvl.experts import apply_hte
from compactvl.losses import FSQ, propagate, sinusoidal_2d
from compactvl.policies import SIP, FastV, build_policy
from compactvl.runner import Runner, RunState, Signals, positions_from_mask
from compactvl.testing import tiny_lm, layout_batch

LAYERS = 4


# ------------------------------------------------------------------------------------------------ FSQ
def fsq_reference(z: float, L: int) -> float:
    h = (L - 1) * (1 + 1e-3) / 2
    o = 0.5 if L % 2 == 0 else 0.0
    return round(h * math.tanh(z + math.atanh(o / h)) - o) / (L // 2)


@pytest.mark.parametrize("levels", [5, 4, [8, 5, 5, 3]])
def test_fsq_matches_its_definition(levels):
    q = FSQ(levels, normalize=False)
    z = torch.randn(300, 4, generator=torch.Generator().manual_seed(0)) * 2
    out = q.quantize(z)
    per_dim = levels if isinstance(levels, list) else [levels] * 4
    ref = torch.tensor([[fsq_reference(float(z[n, d]), per_dim[d]) for d in range(4)] for n in range(300)])
    torch.testing.assert_close(out, ref.float(), rtol=0, atol=1e-6)
    for d, L in enumerate(per_dim):
        assert len(set(out[:, d].tolist())) == L  # exactly L levels are used, all reachable
        assert out[:, d].abs().max() <= 1.0
        codes = q.codes(z)[:, d]
        assert codes.min() == 0 and codes.max() == L - 1
    z.requires_grad_(True)
    q.quantize(z).sum().backward()  # straight-through: d/dz of the bound, divided by ⌊L/2⌋
    Ls = torch.tensor(per_dim, dtype=torch.float32)
    h = (Ls - 1) * (1 + 1e-3) / 2
    s = torch.atanh((Ls % 2 == 0).float() * 0.5 / h)
    half_width = torch.div(Ls, 2, rounding_mode="floor")
    torch.testing.assert_close(z.grad, h * (1 - torch.tanh(z.detach() + s) ** 2) / half_width)


def test_fsq_normalises_and_projects_with_a_fixed_map():
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1)) * 5 + 3
    q = FSQ(5, dim=6, in_dim=16)
    assert not list(q.parameters())  # nothing learns on the target side
    P = q.projection
    torch.testing.assert_close(P.T @ P, torch.eye(6), rtol=0, atol=1e-5)
    torch.testing.assert_close(q(x), q.quantize(F.layer_norm(x, (16,)) @ P))
    assert torch.equal(FSQ(5, dim=6, in_dim=16).projection, P)  # seeded: the same map every time
    with pytest.raises(ConfigError, match="levels=1"):
        FSQ(1)
    with pytest.raises(ConfigError, match="dim=20 is larger than the feature width 16"):
        FSQ(5, dim=20, in_dim=16)


# ------------------------------------------------------------------------------------------------ propagation
def naive_propagate(z0, keys, values, valid, alpha, T, k, tau):
    out = torch.zeros_like(z0)
    for b in range(z0.shape[0]):
        idx = [r for r in range(keys.shape[1]) if valid[b, r]]
        for p in range(z0.shape[1]):
            z = z0[b, p]
            for _ in range(T):
                s = {r: float((z @ keys[b, r]).detach()) / tau for r in idx}
                top = sorted(idx, key=lambda r: -s[r])[:k]
                e = torch.tensor([s[r] for r in top])
                a = torch.softmax(e, 0) if top else e
                z = alpha * sum((a[j] * values[b, r] for j, r in enumerate(top)), torch.zeros_like(z)) \
                    + (1 - alpha) * z0[b, p]
            out[b, p] = z
    return out


def test_propagation_equals_its_equations():
    g = torch.Generator().manual_seed(0)
    z0, keys, values = (torch.randn(3, n, 8, generator=g) for n in (5, 7, 7))
    valid = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0], [0] * 7]).bool()  # 5, 1 and 0 retained
    got = propagate(z0, keys, values, valid, alpha=0.8, iterations=3, topk=3, tau=math.sqrt(8))
    ref = naive_propagate(z0, keys, values, valid, 0.8, 3, 3, math.sqrt(8))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], 0.2 * z0[2])  # nothing retained: only the structural prior is left


def test_sinusoidal_embedding_is_the_2d_formula():
    pos = torch.tensor([[0.0, 0.0], [2.0, 3.0], [1.5, 0.5]])
    pe = sinusoidal_2d(pos, 18)  # 4 * 4 channels + 2 of padding
    q = 4
    for n, (r, c) in enumerate(pos.tolist()):
        w = [10000 ** (-i / q) for i in range(q)]
        ref = [math.sin(r * x) for x in w] + [math.cos(r * x) for x in w] + [math.sin(c * x) for x in w] + \
              [math.cos(c * x) for x in w] + [0.0, 0.0]
        torch.testing.assert_close(pe[n], torch.tensor(ref), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the SIP loss
def pruned_lm():
    lm = tiny_lm(num_hidden_layers=LAYERS)
    apply_hte(lm, layers=[2, 3])
    return lm


batch = layout_batch


def sip_reference(sip: SIP, x0, vis0, pos, final_hidden, final_orig, final_vis):
    """Eqs. 9-12 one sample at a time, from the layer-0 input and the capture layer's output."""
    D = x0.shape[-1]
    errs = []
    for b in range(x0.shape[0]):
        slots = torch.nonzero(vis0[b]).flatten().tolist()  # original indices of the visual tokens
        kept = {int(o): final_hidden[b, j] for j, o in enumerate(final_orig[b].tolist()) if o >= 0 and final_vis[b, j]}
        V = torch.stack([F.layer_norm(kept[o], (D,)) for o in slots if o in kept])
        P = sinusoidal_2d(pos[b], D)
        r_idx = [j for j, o in enumerate(slots) if o in kept]
        p_idx = [j for j, o in enumerate(slots) if o not in kept]
        K = V + P[r_idx]
        Z = naive_propagate(P[p_idx][None], K[None], V[None], torch.ones(1, len(r_idx), dtype=torch.bool),
                            sip.alpha, sip.iterations, sip.topk, math.sqrt(D))[0]
        rec = torch.zeros(len(slots), D)
        rec[r_idx], rec[p_idx] = V, Z
        target = sip.fsq(x0[b, slots]) if sip.target == "fsq" else x0[b, slots]
        errs.append(((sip.head(rec) - target) ** 2).mean(-1))
    return torch.cat(errs).mean()


def grid_positions(n):
    side = math.ceil(math.sqrt(n))
    return torch.tensor([[j // side, j % side] for j in range(n)], dtype=torch.float32)


@pytest.mark.parametrize("target", ["fsq", "mse"])
def test_sip_loss_in_a_pruned_forward_equals_a_per_sample_recomputation(target):
    lm = pruned_lm()
    sip = SIP(target=target, topk=3, iterations=2)
    runner = Runner(lm, [sip, build_policy({"policy": "hte", "keep": 0.5})])
    emb, mask, vis = batch(lm, ["ttVVVVVVVVVt", "tVVVVVt"])
    seen = {}
    lm.model.layers[-1].register_forward_hook(lambda m, a, o: seen.update(h=(o[0] if isinstance(o, tuple) else o)))
    out = runner.prefill(emb, mask, vis, use_cache=False)
    (loss,) = out.state.signals.aux_losses
    pos = [grid_positions(9), grid_positions(5)]  # no visual_pos given: ceil(sqrt(n))-wide grid in order
    ref = sip_reference(sip, emb, vis, pos, seen["h"], out.state.orig_index, out.state.visual)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert out.state.visual.sum(-1).tolist() == [5, 3]  # pruning did happen (9 -> 5, 5 -> 3)


def test_sip_uses_the_grid_positions_it_is_given():
    lm = pruned_lm()
    sip = SIP(topk=2)
    runner = Runner(lm, [sip, build_policy({"policy": "hte", "keep": 0.5})])
    emb, mask, vis = batch(lm, ["tVVVVVVt", "ttVVVVtt"])
    pos = torch.zeros(2, 8, 2)
    pos[vis] = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1], [5, 5], [7, 3], [0, 4], [2, 2]]).float()
    state0 = RunState(emb, positions_from_mask(mask), mask, vis,
                      torch.where(mask, torch.arange(8).expand(2, 8), -1), signals=Signals(visual_pos=pos))
    sip.before_layer(0, state0, runner)
    keep = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1], [1, 1, 0, 1, 1, 0, 1, 1]]).bool()
    state1 = state0.select(keep)
    state1.hidden = torch.randn(state1.hidden.shape, generator=torch.Generator().manual_seed(2))
    sip.after_layer(LAYERS - 1, state1, runner)
    (loss,) = state1.signals.aux_losses
    ref = sip_reference(sip, emb, vis, [pos[0][vis[0]], pos[1][vis[1]]], state1.hidden, state1.orig_index,
                        state1.visual)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_sip_loss_decreases_in_a_few_steps_and_is_off_outside_training():
    lm = pruned_lm()
    sip = SIP()
    runner = Runner(lm, [sip, build_policy({"policy": "hte", "drop_rate": 0.5})])
    emb, mask, vis = batch(lm, ["ttVVVVVVVVVVVVVVVVt", "tVVVVVVVVVt"])
    lm.train()
    opt = torch.optim.Adam([*lm.parameters(), *sip.parameters()], lr=3e-3)
    losses = []
    for _ in range(6):
        out = runner.prefill(emb, mask, vis, use_cache=False)
        loss = out.state.signals.aux_losses[-1]  # the SIP term (the balance losses come first)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sip.head.weight.grad is not None
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0]
    with torch.no_grad():  # generation / evaluation: no SIP work, no auxiliary loss
        assert not runner.prefill(emb, mask, vis, use_cache=False).state.signals.aux_losses
    sip.eval()
    lm.eval()
    assert not runner.prefill(emb, mask, vis, use_cache=False).state.signals.aux_losses


def test_sip_needs_a_pruning_policy_after_it_and_valid_knobs():
    lm = pruned_lm()
    with pytest.raises(ConfigError, match="sip reconstructs the visual tokens a pruning policy dropped.*no pruning "
                                          "policy"):
        Runner(lm, [SIP()])
    with pytest.raises(ConfigError, match="sip must come before the pruning policies"):
        Runner(lm, [FastV(layer=2), SIP()])
    Runner(lm, [SIP(), FastV(layer=2)])  # any pruning policy will do
    with pytest.raises(ConfigError, match="layer=9 is outside this LM's decoder layers 0..3"):
        Runner(lm, [SIP(layer=9), FastV(layer=2)])
    with pytest.raises(ConfigError, match="alpha=1.5 is the propagation factor"):
        SIP(alpha=1.5)
    with pytest.raises(ConfigError, match="target='l1'"):
        build_policy({"policy": "sip", "target": "l1"})
    with pytest.raises(ConfigError, match="iterations=0"):
        SIP(iterations=0)
