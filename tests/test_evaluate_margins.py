"""M_k prefix margins against an independent reference: transformers (PyTorch) log-probs.

Two tiny random Llamas (policy, reference) are written with ``save_pretrained`` and
loaded by transformers. For each pair the per-token log-probs of both responses are
computed in PyTorch; from them (numpy) the full DPO margin, the DPO+POET margin (both
responses physically cut to k = min length, re-run in PyTorch) and M at relative
positions. ``prefix_margin_report`` must agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

BETA = 0.25
VOCAB = 50
PAD = 0


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(policy, reference) CausalLMs and their transformers twins."""
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from poet_jax.models import CausalLM, ModelConfig, save_pretrained

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, eos_token_ids=(1,), pad_token_id=PAD)
    out = {}
    for name, seed in (("policy", 1), ("reference", 2)):
        m = CausalLM(cfg, rngs=nnx.Rngs(seed))
        d = save_pretrained(m, tmp_path_factory.mktemp(name))
        out[name] = m
        out["hf_" + name] = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    return out


def _examples():
    from poet_jax.data import Example

    rng = np.random.default_rng(0)
    spec = [(3, 4, 9), (5, 7, 2), (2, 6, 6), (4, 1, 5), (6, 8, 3)]  # prompt, chosen, rejected lengths
    exs = []
    for i, (p, c, r) in enumerate(spec):
        ids = lambda n: rng.integers(2, VOCAB, n).astype(np.int32)  # noqa: E731
        exs.append(Example(ids(p), ids(c), ids(r), "synthetic", i))
    return exs


def _torch_token_logps(model, prompt, response):
    """log p(response_t | prompt, response_<t) for each response token (float64 numpy)."""
    ids = torch.tensor(np.concatenate([prompt, response])[None].astype(np.int64))
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    p = len(prompt)
    tgt = ids[0, p:]
    return lp[p - 1: p - 1 + len(response)].gather(-1, tgt[:, None])[:, 0].numpy()


def _torch_margin(models, ex, k_c=None, k_r=None):
    """beta * [(pi - ref)(chosen[:k_c]) - (pi - ref)(rejected[:k_r])], rows physically truncated."""
    c = ex.chosen_ids[:k_c]
    r = ex.rejected_ids[:k_r]
    pol, ref = models["hf_policy"], models["hf_reference"]
    dc = _torch_token_logps(pol, ex.prompt_ids, c).sum() - _torch_token_logps(ref, ex.prompt_ids, c).sum()
    dr = _torch_token_logps(pol, ex.prompt_ids, r).sum() - _torch_token_logps(ref, ex.prompt_ids, r).sum()
    return BETA * (dc - dr)


def test_prefix_margins_match_transformers(tiny_pair):
    from poet_jax.evaluate.margins import prefix_margin_report

    exs = _examples()
    # batch of 2: the last batch carries a filler pair that must be ignored
    rep = prefix_margin_report(tiny_pair["policy"], tiny_pair["reference"], exs, PAD, beta=BETA, batch_size=2,
                               fractions=(0.1, 0.5, 1.0))
    assert rep.n_pairs == len(exs)
    K = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in exs)
    assert rep.margins.shape == (len(exs), K)

    full, poet, per_token = [], [], []
    for i, ex in enumerate(exs):
        nc, nr = len(ex.chosen_ids), len(ex.rejected_ids)
        k = min(nc, nr)
        f = _torch_margin(tiny_pair, ex)
        p = _torch_margin(tiny_pair, ex, k, k)  # DPO+POET: both responses physically cut to k
        full.append(f)
        poet.append(p)
        # M at k = full length (and past it) is the sequence-level DPO margin
        np.testing.assert_allclose(rep.margins[i, max(nc, nr) - 1], f, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rep.margins[i, -1], f, rtol=1e-4, atol=1e-5)
        # M at k = min length is the DPO+POET margin
        np.testing.assert_allclose(rep.margins[i, k - 1], p, rtol=1e-4, atol=1e-5)
        # every prefix: M_j from torch per-token values (tokens past a response's end count 0)
        pol, ref = tiny_pair["hf_policy"], tiny_pair["hf_reference"]
        dc = _torch_token_logps(pol, ex.prompt_ids, ex.chosen_ids) - _torch_token_logps(ref, ex.prompt_ids, ex.chosen_ids)
        dr = (_torch_token_logps(pol, ex.prompt_ids, ex.rejected_ids)
              - _torch_token_logps(ref, ex.prompt_ids, ex.rejected_ids))
        curve = BETA * (np.cumsum(np.pad(dc, (0, K - nc))) - np.cumsum(np.pad(dr, (0, K - nr))))
        np.testing.assert_allclose(rep.margins[i], curve, rtol=1e-4, atol=1e-5)
        per_token.append(curve)

    full, curves = np.array(full), np.array(per_token)
    np.testing.assert_allclose(rep.margin, full.mean(), rtol=1e-4, atol=1e-6)
    assert rep.accuracy == pytest.approx((full > 0).mean())
    np.testing.assert_allclose(rep.mean_by_k, curves.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rep.positive_by_k, (curves > 0).mean(0))
    # relative positions: k = max(1, ceil(f * min length))
    for j, f in enumerate((0.1, 0.5, 1.0)):
        ks = [max(1, math.ceil(f * min(len(e.chosen_ids), len(e.rejected_ids)))) for e in exs]
        vals = np.array([curves[i, k - 1] for i, k in enumerate(ks)])
        np.testing.assert_allclose(rep.mean_by_fraction[j], vals.mean(), rtol=1e-4, atol=1e-5)
        assert rep.positive_by_fraction[j] == pytest.approx((vals > 0).mean())
    # at fraction 1.0 it is the POET margin
    np.testing.assert_allclose(rep.mean_by_fraction[-1], np.mean(poet), rtol=1e-4, atol=1e-5)
    assert rep.at(10_000) == (pytest.approx(rep.margin), pytest.approx(rep.accuracy))


def test_same_model_gives_zero_margins(tiny_pair):
    from poet_jax.evaluate.margins import prefix_margin_report

    rep = prefix_margin_report(tiny_pair["policy"], tiny_pair["policy"], _examples(), PAD, beta=BETA)
    assert np.abs(rep.margins).max() == 0.0
    assert rep.accuracy == 0.0 and rep.margin == 0.0


def test_report_errors_and_plot(tiny_pair, tmp_path):
    from poet_jax.evaluate.margins import prefix_margin_report, reduce_prefix_margins
    from poet_jax.evaluate.plots import plot_prefix_margins

    with pytest.raises(ValueError, match="beta"):
        prefix_margin_report(tiny_pair["policy"], tiny_pair["reference"], _examples(), PAD, beta=0.0)
    with pytest.raises(ValueError, match="no held-out pairs"):
        prefix_margin_report(tiny_pair["policy"], tiny_pair["reference"], [], PAD, beta=0.1)
    with pytest.raises(ValueError, match="longest response"):
        reduce_prefix_margins(np.zeros((1, 2)), np.array([3]), np.array([1]), beta=0.1)
    a = reduce_prefix_margins(np.array([[0.1, 0.2, -0.3]]), np.array([3]), np.array([2]), beta=0.1)
    b = reduce_prefix_margins(np.array([[-0.1, 0.2, 0.4]]), np.array([1]), np.array([3]), beta=0.1)
    assert a.at(1) == (pytest.approx(0.1), 1.0) and a.accuracy == 0.0 and b.accuracy == 1.0
    png = plot_prefix_margins({"DPO": a, "DPO+POET": b}, tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainer_hook_metrics(tiny_pair):
    """prefix_margin_metrics takes the trainer's split state (graphdef, params, rest, ref params)."""
    from flax import nnx

    from poet_jax.evaluate.margins import prefix_margin_metrics, prefix_margin_report

    graphdef, params, rest = nnx.split(tiny_pair["policy"], nnx.Param, ...)
    _, ref_params, _ = nnx.split(tiny_pair["reference"], nnx.Param, ...)
    exs = _examples()
    m = prefix_margin_metrics(graphdef, params, ref_params, exs, PAD, beta=BETA, rest=rest, ks=(1, 3), prefix="eval/")
    rep = prefix_margin_report(tiny_pair["policy"], tiny_pair["reference"], exs, PAD, beta=BETA)
    assert m["eval/M_k/mean@1"] == pytest.approx(rep.at(1)[0]) and m["eval/M_k/positive@3"] == rep.at(3)[1]
    assert m["eval/rewards/margins"] == pytest.approx(rep.margin)
    assert m["eval/M_frac/mean@0.25"] == pytest.approx(rep.mean_by_fraction[1])
