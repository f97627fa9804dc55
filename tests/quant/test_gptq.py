"""GPTQ maths (`gptq_quantize`, `add_to_hessian`) and its `quantize_` handler, on small seeded layers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tokcompile.quant import QUANTIZERS, WeightQuantConfig, compute_qparams, fake_quantize, qrange, quantize_
from tokcompile.quant.base import _HANDLERS
from tokcompile.quant.gptq import GPTQConfig, GPTQResult, add_to_hessian, gptq_quantize

O, I, N = 64, 256, 2048  # noqa: E741  (out, in features, samples: the paper's names)


def _data(seed: int = 0, n: int = N, cols: int = I, rows: int = O) -> tuple[Tensor, Tensor, Tensor]:
    """Correlated inputs X = Z M with uneven feature scales, a weight W, and H = 2XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, cols, generator=g)
    M = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = (Z @ M) * torch.rand(cols, generator=g).mul(3).add(0.2)  # (n, I)
    W = torch.randn(rows, cols, generator=g)  # (O, I)
    H, _ = add_to_hessian(None, 0, X)
    return X, W, H


def _out_err(X: Tensor, W: Tensor, W_hat: Tensor) -> float:
    return torch.linalg.vector_norm(X @ W.T - X @ W_hat.T).item()


def _run(W: Tensor, H: Tensor, **kw) -> GPTQResult:
    args = dict(bit=4, symmetric=True, group_size=None) | kw
    return gptq_quantize(W, H, **args)


def _assert_on_grid(res: GPTQResult, bit: int, symmetric: bool) -> None:
    qmin, qmax = qrange(bit, symmetric)
    assert res.codes.dtype == torch.int32
    assert int(res.codes.min()) >= qmin and int(res.codes.max()) <= qmax
    assert torch.equal(res.weight, res.dequantize())  # bitwise: every column on its group's grid
    if symmetric:
        assert torch.all(res.zero == 0)


@pytest.fixture(scope="module")
def data() -> tuple[Tensor, Tensor, Tensor]:
    return _data()


def test_hessian_accumulation() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 10, 16, generator=g), torch.randn(37, 16, generator=g)
    H1, n1 = add_to_hessian(None, 0, a)
    H1, n1 = add_to_hessian(H1, n1, b)
    X = torch.cat([a.reshape(-1, 16), b])  # (67, 16)
    H2, n2 = add_to_hessian(None, 0, X)
    assert n1 == n2 == 67
    torch.testing.assert_close(H1, H2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(H2, 2 / 67 * X.T @ X, atol=1e-5, rtol=1e-5)
    assert H1.dtype == torch.float32 and H1.shape == (16, 16)
    with pytest.raises(ValueError, match="features"):
        add_to_hessian(H1, n1, torch.randn(4, 8))


@pytest.mark.parametrize("group_size", [None, 128])
def test_beats_rtn_on_correlated_inputs(data, group_size: int | None) -> None:
    X, W, H = data
    res = _run(W, H, group_size=group_size)
    _assert_on_grid(res, 4, True)
    rtn = _out_err(X, W, fake_quantize(W, 4, True, group_size))
    assert _out_err(X, W, res.weight) < 0.9 * rtn
    assert res.retries == 0 and res.damp == pytest.approx(0.01 * torch.diag(H).mean().item())


def test_identity_hessian_equals_rtn(data) -> None:
    _, W, _ = data
    for gs in (None, 32):
        res = _run(W, torch.eye(I), group_size=gs, blocksize=64)  # diagonal Hinv: no error feedback
        assert torch.equal(res.weight, fake_quantize(W, 4, True, gs))
        s, z = compute_qparams(W, 4, True, gs)
        assert torch.equal(res.scale, s) and torch.equal(res.zero, z)


def test_blocksize(data) -> None:
    X, W, H = data
    whole = _run(W, H, blocksize=I)
    assert torch.equal(whole.weight, _run(W, H, blocksize=2 * I).weight)
    blocked = _run(W, H, blocksize=32)  # same maths, different float summation order
    _assert_on_grid(blocked, 4, True)
    assert (blocked.codes != whole.codes).float().mean() < 0.02
    assert _out_err(X, W, blocked.weight) == pytest.approx(_out_err(X, W, whole.weight), rel=0.05)


def test_percdamp_changes_result(data) -> None:
    _, W, H = data
    low, high = _run(W, H, percdamp=0.01), _run(W, H, percdamp=1.0)
    assert not torch.equal(low.weight, high.weight)
    assert high.damp == pytest.approx(100 * low.damp)


def test_actorder(data) -> None:
    X, W, H = data
    plain, act = _run(W, H, group_size=128), _run(W, H, group_size=128, actorder=True)
    assert not torch.equal(plain.weight, act.weight)
    _assert_on_grid(act, 4, True)
    assert _out_err(X, W, act.weight) < 1.05 * _out_err(X, W, plain.weight)
    # Dynamic groups under act-order: group k is the k-th run of 128 columns in diag(H)-descending order.
    perm = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(act.perm, perm)
    assert torch.equal(act.g_idx[perm], torch.arange(I) // 128)
    assert not torch.equal(act.g_idx, torch.arange(I) // 128)
    assert torch.equal(torch.bincount(act.g_idx), torch.tensor([128, 128]))
    assert torch.equal(plain.g_idx, torch.arange(I) // 128) and plain.perm is None


def test_static_groups_with_actorder(data) -> None:
    _, W, H = data
    res = _run(W, H, group_size=64, actorder=True, static_groups=True)
    s, z = compute_qparams(W, 4, True, 64)  # original, unpermuted groups
    assert torch.equal(res.scale, s) and torch.equal(res.zero, z)
    assert torch.equal(res.g_idx, torch.arange(I) // 64)
    _assert_on_grid(res, 4, True)
    # Each column lies on its ORIGINAL group's grid: Ŵ / s is an integer in range.
    s_col = s.repeat_interleave(64, dim=1)  # (O, I)
    q = (res.weight / s_col).round()
    assert torch.equal(res.weight, q * s_col) and q.abs().max() <= 8
    assert not torch.equal(res.weight, _run(W, H, group_size=64, static_groups=True).weight)


@pytest.mark.parametrize("bit", [3, 4, 8])
def test_asymmetric_codes(data, bit: int) -> None:
    _, W, H = data
    res = _run(W[:, :128], H[:128, :128], bit=bit, symmetric=False, group_size=32)
    _assert_on_grid(res, bit, False)
    assert res.zero.max() > 0 and res.scale.shape == (O, 4)


def test_bad_group_size(data) -> None:
    _, W, H = data
    with pytest.raises(ValueError, match="does not divide"):
        _run(W, H, group_size=100)
    with pytest.raises(ValueError, match="H"):
        _run(W, H[:10, :10])


def test_dead_columns() -> None:
    X, W, _ = _data(n=512, cols=64, rows=16)
    X[:, [3, 40]] = 0
    H, _ = add_to_hessian(None, 0, X)
    for kw in ({}, {"group_size": 16, "actorder": True}):
        res = _run(W, H, **kw)
        assert torch.all(res.weight[:, [3, 40]] == 0)
        _assert_on_grid(res, 4, True)


def test_indefinite_hessian_raises_damping() -> None:
    g = torch.Generator().manual_seed(3)
    B = torch.randn(64, 16, generator=g)
    H = B @ B.T / 16  # rank 16
    Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    neg = Q[:, :4]  # inject eigenvalues of -0.005·mean(diag H)
    H = H - 0.005 * torch.diag(H).mean() * neg @ neg.T
    W = torch.randn(8, 64, generator=g)
    with pytest.warns(UserWarning, match="percdamp"):
        res = _run(W, H, percdamp=1e-6)
    assert res.retries > 0 and res.damp > 0.005 * torch.diag(H).mean().item()
    _assert_on_grid(res, 4, True)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="Cholesky"):
        _run(W, -torch.eye(64) - 1.0, percdamp=1e-6)  # negative diagonal: damping can never help


def test_config_registered() -> None:
    assert QUANTIZERS.get("GPTQ") is GPTQConfig and GPTQConfig in _HANDLERS
    cfg = GPTQConfig(WeightQuantConfig(4, group_size=128))
    assert (cfg.blocksize, cfg.percdamp, cfg.actorder, cfg.static_groups, cfg.true_sequential) == (
        128, 0.01, False, False, True,
    )
    with pytest.raises(ValueError, match="blocksize"):
        GPTQConfig(WeightQuantConfig(4), blocksize=0)
    with pytest.raises(ValueError, match="percdamp"):
        GPTQConfig(WeightQuantConfig(4), percdamp=0.0)


def test_handler_quantizes_sequential() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    X = torch.randn(256, 32) @ torch.randn(32, 32)
    hessians: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(_m: nn.Module, inp: tuple[Tensor, ...], _out: Tensor) -> None:
            hessians[name], counts[name] = add_to_hessian(hessians.get(name), counts.get(name, 0), inp[0])

        return fn

    handles = [model[i].register_forward_hook(hook(str(i))) for i in (0, 2)]
    with torch.no_grad():
        model(X[:128]), model(X[128:])
    for h in handles:
        h.remove()
    before = {n: model[int(n)].weight.detach().clone() for n in ("0", "2")}
    cfg = GPTQConfig(WeightQuantConfig(4, group_size=16), actorder=True)
    results: dict[str, GPTQResult] = {}
    report = quantize_(model, cfg, hessians=hessians, results=results)
    assert report.method == "gptq" and report.layers == ("0", "2")
    for n in ("0", "2"):
        w = model[int(n)].weight.detach()
        assert not torch.equal(w, before[n])
        assert torch.equal(w, results[n].dequantize())
        _assert_on_grid(results[n], 4, True)
        assert 0 < report.rel_errors[n] < 0.2
    with pytest.raises(ValueError, match="'2'"):
        quantize_(nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)), cfg, hessians={"0": hessians["0"]})
