"""Optimizers against their published update rules, groups, clipping, schedule, checkpoints."""

import math

import numpy as np
import pytest

import tinymm as tm
from tinymm import io
from tinymm.optim import SGD, Adam, AdamW, clip_grad_norm_, cosine_schedule, set_lr

SHAPES = [(3, 4), (4,), ()]


def make_params(seed=0, dtype=np.float64, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [tm.tensor(rng.standard_normal(s).astype(dtype), requires_grad=True) for s in shapes]


def grad_sequence(steps, seed=1, dtype=np.float64, shapes=SHAPES):
    """grads[t][i]: the gradient of parameter i at step t (fixed, so runs can be compared)."""
    rng = np.random.default_rng(seed)
    return [[np.asarray(rng.standard_normal(s), dtype) for s in shapes] for _ in range(steps)]


def run(optimizer, params, grads):
    """Feed the given gradients to the optimizer, one step each; return the parameter values."""
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.copy()
        optimizer.step()
    return [p.data.copy() for p in params]


OPTIMIZERS = {
    "sgd": lambda ps: SGD(ps, lr=0.1),
    "sgd_momentum": lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda ps: Adam(ps, lr=0.01, weight_decay=0.01),
    "adamw": lambda ps: AdamW(ps, lr=0.01, betas=(0.8, 0.99)),
}


# --- each optimizer against its formula, written out here ---------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_one_step(weight_decay):
    params = make_params()
    start = [p.data.copy() for p in params]
    (grads,) = grad_sequence(1)
    run(SGD(params, lr=0.3, weight_decay=weight_decay), params, [grads])
    for p, p0, g in zip(params, start, grads, strict=True):
        np.testing.assert_allclose(p.data, p0 - 0.3 * (g + weight_decay * p0), rtol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_several_steps(nesterov):
    lr, mu, lam, steps = 0.1, 0.9, 0.05, 5
    params = make_params()
    grads = grad_sequence(steps)
    got = run(SGD(params, lr, momentum=mu, nesterov=nesterov, weight_decay=lam), params, grads)

    for i, p0 in enumerate(make_params()):
        p, b = p0.data.copy(), None
        for t in range(steps):
            g = grads[t][i] + lam * p
            b = g if b is None else mu * b + g  # b_1 = g_1 (no dampening)
            d = g + mu * b if nesterov else b
            p = p - lr * d
        np.testing.assert_allclose(got[i], p, rtol=1e-12, atol=1e-14)


def adam_reference(p, grads, lr, beta1, beta2, eps, l2=0.0, decoupled=0.0):
    """Kingma & Ba, Algorithm 1; `l2` adds lambda p to g, `decoupled` is AdamW's lambda."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * decoupled * p
        g = g + l2 * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adam_one_step_is_a_signed_step_of_size_lr():
    params = make_params()
    start = [p.data.copy() for p in params]
    (grads,) = grad_sequence(1)
    run(Adam(params, lr=0.01, eps=1e-8), params, [grads])
    for p, p0, g in zip(params, start, grads, strict=True):
        # t = 1: m^ = g, v^ = g^2, so the step is lr g / (|g| + eps), about lr sign(g)
        np.testing.assert_allclose(p.data, p0 - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-14)


@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_and_adamw_several_steps_match_the_papers(cls, weight_decay):
    lr, betas, eps, steps = 0.02, (0.8, 0.95), 1e-6, 6
    params = make_params()
    grads = grad_sequence(steps)
    got = run(cls(params, lr, betas, eps, weight_decay), params, grads)
    decay = {"l2": weight_decay} if cls is Adam else {"decoupled": weight_decay}
    for i, p0 in enumerate(make_params()):
        per_param = [step_grads[i] for step_grads in grads]
        want = adam_reference(p0.data.copy(), per_param, lr, *betas, eps, **decay)
        np.testing.assert_allclose(got[i], want, rtol=1e-12, atol=1e-14)


def test_adamw_differs_from_adam_exactly_by_decoupled_decay():
    lr, wd = 0.01, 0.3
    adamw_params, adam_params = make_params(), make_params()
    adamw, adam = AdamW(adamw_params, lr=lr, weight_decay=wd), Adam(adam_params, lr=lr)
    for step_grads in grad_sequence(5):
        before_w = [p.data.copy() for p in adamw_params]
        before_a = [p.data.copy() for p in adam_params]
        run(adamw, adamw_params, [step_grads])
        run(adam, adam_params, [step_grads])
        for pw, pa, bw, ba in zip(adamw_params, adam_params, before_w, before_a, strict=True):
            # the same Adam step from the same gradients, plus -lr wd p on AdamW's side
            np.testing.assert_allclose(pw.data - bw, (pa.data - ba) - lr * wd * bw, atol=1e-15)
    # L2 decay inside Adam is a different method: it is rescaled by 1 / sqrt(v^)
    l2_params = make_params()
    run(Adam(l2_params, lr=lr, weight_decay=wd), l2_params, grad_sequence(5))
    assert not np.allclose(l2_params[0].data, adamw_params[0].data, atol=1e-6)


# --- parameter groups, skipping, validation -----------------------------------------------------


def test_parameter_groups_use_their_own_hyperparameters():
    w, b = make_params(shapes=[(3, 3), (3,)])
    w0, b0 = w.data.copy(), b.data.copy()
    gw, gb = np.ones((3, 3)), np.ones(3)
    opt = SGD(
        [{"params": [w]}, {"params": [b], "lr": 0.5, "weight_decay": 0.0}], 0.1, 0, False, 1.0
    )
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 1.0
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["momentum"] == 0
    w.grad, b.grad = gw, gb
    opt.step()
    np.testing.assert_allclose(w.data, w0 - 0.1 * (gw + 1.0 * w0))
    np.testing.assert_allclose(b.data, b0 - 0.5 * gb)

    # lr written into param_groups (what a schedule does) takes effect at the next step
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    w1 = w.data.copy()
    opt.step()
    np.testing.assert_allclose(w.data, w1 - 0.01 * (gw + w1))


def test_adamw_group_without_decay_is_plain_adam():
    w, b = make_params(shapes=[(4,), (4,)])
    ref = make_params(shapes=[(4,), (4,)])
    grads = grad_sequence(3, shapes=[(4,), (4,)])
    groups = [{"params": [w], "betas": (0.5, 0.9)}, {"params": [b], "weight_decay": 0.0}]
    run(AdamW(groups, lr=0.1, weight_decay=0.5), [w, b], grads)
    w_ref = adam_reference(ref[0].data, [g[0] for g in grads], 0.1, 0.5, 0.9, 1e-8, decoupled=0.5)
    b_ref = adam_reference(ref[1].data, [g[1] for g in grads], 0.1, 0.9, 0.999, 1e-8)
    np.testing.assert_allclose(w.data, w_ref, rtol=1e-12)
    np.testing.assert_allclose(b.data, b_ref, rtol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parameters_without_grad_are_skipped(name):
    used, unused = make_params(shapes=[(2,), (2,)])
    before = unused.data.copy()
    opt = OPTIMIZERS[name]([used, unused])
    used.grad = np.ones(2)
    opt.step()
    assert np.array_equal(unused.data, before) and not opt.state.get(unused)
    assert not np.array_equal(used.data, make_params(shapes=[(2,)])[0].data)


def test_zero_grad_sets_grads_to_none():
    params = make_params()
    for p in params:
        p.grad = np.ones(p.shape)
    Adam(params).zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_moves_the_version_counter_so_stale_graphs_fail(name):
    params = make_params()
    arrays = [p.data for p in params]
    stale = [(p * p).sum() for p in params]  # each saved its p for its backward
    opt = OPTIMIZERS[name](params)
    run(opt, params, grad_sequence(1))
    for p, array, graph in zip(params, arrays, stale, strict=True):
        assert p.data is array  # updated in place: whoever holds p.data sees the new values
        with pytest.raises(RuntimeError, match="in place"):
            graph.backward()


def test_bad_arguments_are_refused():
    (p,) = make_params(shapes=[(2,)])
    with pytest.raises(ValueError, match="empty"):
        Adam([])
    with pytest.raises(TypeError, match="iterable"):
        Adam(p)
    with pytest.raises(ValueError, match="more than once"):
        Adam([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="lr"):
        SGD([p], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        SGD([p], lr=0.1, nesterov=True)


# --- convergence on a convex quadratic ----------------------------------------------------------

CONVERGE = {
    "sgd": lambda ps: SGD(ps, lr=0.1),
    "sgd_momentum": lambda ps: SGD(ps, lr=0.05, momentum=0.9),
    "sgd_nesterov": lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: Adam(ps, lr=0.05),
    "adamw": lambda ps: AdamW(ps, lr=0.05, weight_decay=0.0),
}


@pytest.mark.parametrize("name", CONVERGE)
def test_convex_quadratic_converges(name):
    """L(p) = sum_i a_i (p_i - c_i)^2, ill-conditioned (a from 0.1 to 5): minimum at p = c."""
    a = tm.tensor(np.linspace(0.1, 5.0, 8, dtype=np.float32))
    c = np.linspace(-2.0, 3.0, 8, dtype=np.float32)
    p = tm.zeros(8, requires_grad=True)
    opt = CONVERGE[name]([p])
    for _ in range(1000):
        opt.zero_grad()
        (a * (p - tm.tensor(c)) ** 2).sum().backward()
        opt.step()
    np.testing.assert_allclose(p.data, c, atol=1e-3)


# --- gradient clipping --------------------------------------------------------------------------


@pytest.mark.parametrize("total", [50.0, 1.25])
def test_clip_grad_norm_returns_total_norm_and_clips_to_max_norm(total):
    params = make_params(shapes=[(5, 5), (5,), (3,)])
    for p, g in zip(params, grad_sequence(1, shapes=[(5, 5), (5,), (3,)])[0], strict=True):
        p.grad = g
    params[2].grad = None  # no gradient: ignored
    unscaled = math.sqrt(sum((p.grad**2).sum() for p in params[:2]))
    grads = [params[0].grad * (total / unscaled), params[1].grad * (total / unscaled)]
    params[0].grad, params[1].grad = grads[0].copy(), grads[1].copy()

    norm = clip_grad_norm_(params, max_norm=1.0)
    assert isinstance(norm, float) and norm == pytest.approx(total, rel=1e-12)
    clipped = math.sqrt(sum((p.grad**2).sum() for p in params[:2]))
    assert clipped == pytest.approx(1.0, rel=1e-5)
    for p, g in zip(params, grads, strict=False):  # one common factor: directions unchanged
        np.testing.assert_allclose(p.grad, g / (total + 1e-6), rtol=1e-12)
    assert params[2].grad is None


def test_clip_grad_norm_leaves_small_gradients_alone():
    params = make_params(shapes=[(4,)])
    params[0].grad = np.full(4, 0.1, np.float32)
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert norm == pytest.approx(0.2, rel=1e-6)
    assert np.array_equal(params[0].grad, np.full(4, 0.1, np.float32))


# --- learning-rate schedule ---------------------------------------------------------------------


def test_cosine_schedule_warmup_endpoints_and_decay():
    total, warmup, base, low = 100, 10, 1e-3, 1e-5
    lrs = [cosine_schedule(s, total, warmup, base, low) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(base / warmup)
    assert lrs[warmup - 1] == pytest.approx(base) and lrs[warmup] == pytest.approx(base)
    assert np.all(np.diff(lrs[:warmup]) > 0)  # linear warmup: equal increments
    np.testing.assert_allclose(np.diff(lrs[:warmup]), base / warmup)
    assert np.all(np.diff(lrs[warmup : total + 1]) < 0)  # cosine: strictly decreasing
    middle = warmup + (total - warmup) // 2
    assert lrs[middle] == pytest.approx((base + low) / 2)
    assert lrs[total] == pytest.approx(low) and lrs[-1] == pytest.approx(low)
    assert cosine_schedule(0, 10, 0, 0.5) == 0.5  # no warmup: starts at base_lr
    with pytest.raises(ValueError, match="warmup"):
        cosine_schedule(0, 10, 10, 0.5)


# --- float32 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float32_stays_float32(name):
    params = make_params(dtype=np.float32)
    opt = OPTIMIZERS[name](params)
    set_lr(opt, np.float64(0.01))  # even a NumPy float64 hyper-parameter must not up-cast
    run(opt, params, grad_sequence(3, dtype=np.float32))
    assert all(p.dtype == np.float32 for p in params)
    buffers = [v for s in opt.state.values() for v in s.values() if isinstance(v, np.ndarray)]
    assert all(b.dtype == np.float32 for b in buffers)
    assert (len(buffers) > 0) == (name != "sgd")


# --- checkpoints: state_dict round trip ---------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_resumes_identically(name, tmp_path):
    shapes = [(3, 4), (4,), (2,)]
    grads = grad_sequence(8, shapes=shapes, dtype=np.float32)

    def make(params):
        opt = OPTIMIZERS[name]([{"params": params[:2]}, {"params": params[2:], "lr": 0.002}])
        return opt

    params = make_params(dtype=np.float32, shapes=shapes)
    opt = make(params)
    run(opt, params, grads[:4])
    set_lr(opt, 0.003)
    io.save(opt.state_dict(), tmp_path / "optim.npz")
    io.save({str(i): p for i, p in enumerate(params)}, tmp_path / "params.npz")
    expected = run(opt, params, grads[4:])

    loaded = io.load(tmp_path / "params.npz")
    resumed_params = [tm.tensor(loaded[str(i)], requires_grad=True) for i in range(3)]
    resumed = make(resumed_params)
    resumed.load_state_dict(io.load(tmp_path / "optim.npz"))
    assert [g["lr"] for g in resumed.param_groups] == [0.003, 0.003]
    assert resumed.param_groups[0].keys() == opt.param_groups[0].keys()
    got = run(resumed, resumed_params, grads[4:])
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b)


def test_state_dict_is_a_copy():
    params = make_params()
    opt = Adam(params)
    run(opt, params, grad_sequence(1))
    sd = opt.state_dict()
    saved = sd["state.0.exp_avg"].copy()
    run(opt, params, grad_sequence(1, seed=5))
    assert np.array_equal(sd["state.0.exp_avg"], saved) and sd["state.0.step"] == 1


def test_load_state_dict_lists_every_mismatch_and_changes_nothing():
    params = make_params()
    opt = Adam(params, lr=0.5)
    run(opt, params, grad_sequence(2))
    sd = opt.state_dict()
    sd["state.0.exp_avg"] = np.zeros((4, 3))  # wrong shape
    sd["state.7.exp_avg"] = np.zeros(3)  # no parameter 7
    sd["state.1.momentum_buffer"] = np.zeros(4)  # an SGD buffer
    del sd["state.2.exp_avg_sq"]
    del sd["param_groups.0.eps"]

    fresh = Adam(make_params(), lr=0.1)
    with pytest.raises(ValueError) as err:
        fresh.load_state_dict(sd)
    message = str(err.value)
    for problem in [
        "state.0.exp_avg: shape (4, 3)",
        "unexpected state.7.exp_avg",
        "unexpected state.1.momentum_buffer",
        "missing state.2.exp_avg_sq",
        "missing param_groups.0.eps",
    ]:
        assert problem in message
    assert fresh.param_groups[0]["lr"] == 0.1 and not fresh.state

    two_groups = Adam([{"params": make_params()[:1]}, {"params": make_params()[1:]}])
    with pytest.raises(ValueError, match="param_groups.0.params: parameters"):
        two_groups.load_state_dict(opt.state_dict())


# --- against PyTorch, when it is installed ------------------------------------------------------

TORCH_CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, betas=(0.85, 0.99), weight_decay=0.3)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("name", "kwargs"), TORCH_CONFIGS)
def test_matches_torch(name, kwargs, dtype):
    torch = pytest.importorskip("torch")
    import tinymm.optim

    shapes = [(5, 3), (3,)]
    ours = make_params(dtype=dtype, shapes=shapes)
    theirs = [torch.tensor(p.data.copy(), requires_grad=True) for p in ours]
    opt = getattr(tinymm.optim, name)(ours, **kwargs)
    torch_opt = getattr(torch.optim, name)(theirs, **kwargs)
    for step_grads in grad_sequence(10, dtype=dtype, shapes=shapes):
        for p, q, g in zip(ours, theirs, step_grads, strict=True):
            p.grad, q.grad = 10 * g, torch.tensor(10 * g)
        ours_norm = clip_grad_norm_(ours, 5.0)
        theirs_norm = torch.nn.utils.clip_grad_norm_(theirs, 5.0).item()
        assert ours_norm == pytest.approx(theirs_norm, rel=1e-6)
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_weight_decay_groups_decay_layer_weights_only():
    from tinymm.models import ViT

    model = ViT(8, 4, channels=3, dim=8, depth=1, heads=2, mlp_ratio=2, num_classes=3)
    decay, rest = tm.optim.weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert all(n.endswith(".weight") and "ln" not in n for n in decayed)
    assert "patch_embedding.weight" in decayed and "blocks.0.attn.q_proj.weight" in decayed
    kept = {names[id(p)] for p in rest["params"]}
    assert {"cls_token", "pos_embedding", "blocks.0.ln1.weight", "patch_embedding.bias"} <= kept
    assert len(decay["params"]) + len(rest["params"]) == len(model.parameters())


# --- the flat update: a whole group at once -----------------------------------------------------


def count_updates(optimizer):
    """Make optimizer._update count its calls: once per group (flat) or once per parameter."""
    calls = []
    update = optimizer._update

    def counted(p, grad, state, group):
        calls.append(p.size)
        return update(p, grad, state, group)

    optimizer._update = counted
    return calls


def one_by_one(optimizer):
    """The same optimizer, made to update one parameter at a time (the plain loop)."""
    optimizer.foreach = False
    return optimizer


GROUPED = {
    **OPTIMIZERS,
    "adam_l2_groups": lambda groups: Adam(groups, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1),
    "adamw_groups": lambda groups: AdamW(groups, lr=0.02, weight_decay=0.3),
}
FLAT_SHAPES = [(3, 4), (4,), (), (2, 1, 3), (5,)]


def grouped(params):
    """Three groups with their own lr and weight decay (one without decay)."""
    return [
        {"params": params[:2]},
        {"params": params[2:4], "lr": 0.003, "weight_decay": 0.0},
        {"params": params[4:], "lr": 0.05, "weight_decay": 0.2},
    ]


def assert_same_state_dict(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", GROUPED)
def test_flat_update_is_the_per_parameter_update(name, dtype):
    """Each group in one _update call, bit for bit what one parameter at a time gives."""
    grads = grad_sequence(6, dtype=dtype, shapes=FLAT_SHAPES)
    flat_params = make_params(dtype=dtype, shapes=FLAT_SHAPES)
    ref_params = make_params(dtype=dtype, shapes=FLAT_SHAPES)
    flat = GROUPED[name](grouped(flat_params))
    ref = one_by_one(GROUPED[name](grouped(ref_params)))
    calls = count_updates(flat)
    for step_grads in grads:
        run(flat, flat_params, [step_grads])
        run(ref, ref_params, [step_grads])
        for p, q in zip(flat_params, ref_params, strict=True):
            assert p.dtype == dtype and np.array_equal(p.data, q.data)
        assert_same_state_dict(flat.state_dict(), ref.state_dict())
    assert calls == [12 + 4, 1 + 6, 5] * len(grads)  # one call per group, all its entries

    for group in flat.param_groups:  # each parameter's buffer is a view of its group's one
        for buffer in set(flat.state_names) & flat.state[group["params"][0]].keys() - {"step"}:
            bases = [flat.state[p][buffer].base for p in group["params"]]
            assert bases[0] is not None and all(base is bases[0] for base in bases)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_without_a_gradient_falls_back_and_later_steps_stay_right(name):
    """A step where one gradient is float64 for a float32 parameter goes one parameter at a
    time, and the next is flat again (buffers rebuilt). A parameter without a gradient is
    skipped (its step count stays): that step goes one by one, and for Adam so do the later
    ones, whose step counts now differ (SGD keeps no step count: it is flat again)."""
    shapes = [(3, 2), (4,), (2,)]
    grads = grad_sequence(7, dtype=np.float32, shapes=shapes)
    grads[1][0] = grads[1][0].astype(np.float64)
    grads[3][1] = None  # no gradient for parameter 1 at step 3

    def run_with_gaps(optimizer, params):
        calls, per_step = count_updates(optimizer), []
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = None if g is None else g.copy()
            optimizer.step()
            per_step.append(len(calls) - sum(per_step))
        return per_step

    flat_params = make_params(dtype=np.float32, shapes=shapes)
    ref_params = make_params(dtype=np.float32, shapes=shapes)
    flat = OPTIMIZERS[name](flat_params)
    per_step = run_with_gaps(flat, flat_params)
    run_with_gaps(one_by_one(OPTIMIZERS[name](ref_params)), ref_params)
    for p, q in zip(flat_params, ref_params, strict=True):
        assert np.array_equal(p.data, q.data)
    assert per_step == [1, 3, 1, 2] + ([3, 3, 3] if "adam" in name else [1, 1, 1])

    if "adam" in name:  # the skipped parameter took 6 steps, the others 7
        state = flat.state_dict()
        assert [int(state[f"state.{i}.step"]) for i in range(3)] == [7, 6, 7]
        start = make_params(dtype=np.float32, shapes=shapes)[1].data.astype(np.float64)
        kept = [g[1].astype(np.float64) for g in grads if g[1] is not None]
        if name == "adam":
            want = adam_reference(start, kept, 0.01, 0.9, 0.999, 1e-8, l2=0.01)
        else:
            want = adam_reference(start, kept, 0.01, 0.8, 0.99, 1e-8, decoupled=0.01)
        np.testing.assert_allclose(flat_params[1].data, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", GROUPED)
def test_load_state_dict_rebuilds_the_flat_buffers(name):
    """A fresh optimizer given the state_dict continues exactly as the original, in one _update
    per group again, and its state_dict stays the original's."""
    grads = grad_sequence(7, dtype=np.float32, shapes=FLAT_SHAPES)
    params = make_params(dtype=np.float32, shapes=FLAT_SHAPES)
    opt = GROUPED[name](grouped(params))
    run(opt, params, grads[:3])
    saved = opt.state_dict()

    resumed_params = [tm.tensor(p.data.copy(), requires_grad=True) for p in params]
    resumed = GROUPED[name](grouped(resumed_params))
    resumed.load_state_dict(saved)
    assert_same_state_dict(resumed.state_dict(), saved)
    calls = count_updates(resumed)
    for step_grads in grads[3:]:
        run(opt, params, [step_grads])
        run(resumed, resumed_params, [step_grads])
        for p, q in zip(params, resumed_params, strict=True):
            assert np.array_equal(p.data, q.data)
        assert_same_state_dict(resumed.state_dict(), opt.state_dict())
    assert len(calls) == 3 * len(grads[3:])


def test_state_written_by_hand_is_what_the_next_step_uses():
    """The flat buffers are used only while every parameter's state is its slice of them: a
    buffer replaced in `optimizer.state`, or a cleared state, is what the next step reads."""
    grads = grad_sequence(6, dtype=np.float32, shapes=FLAT_SHAPES)
    runs = []
    for make in (AdamW, lambda params: one_by_one(AdamW(params))):
        params = make_params(dtype=np.float32, shapes=FLAT_SHAPES)
        opt = make(params)
        run(opt, params, grads[:2])
        opt.state[params[1]]["exp_avg"] = np.full(4, 0.5, np.float32)
        run(opt, params, grads[2:4])
        opt.state.clear()  # restart the moments and step counts
        run(opt, params, grads[4:])
        runs.append((params, opt.state_dict()))
    (flat_params, flat_state), (ref_params, ref_state) = runs
    for p, q in zip(flat_params, ref_params, strict=True):
        assert np.array_equal(p.data, q.data)
    assert_same_state_dict(flat_state, ref_state)
    assert int(flat_state["state.0.step"]) == 2


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_foreach_false_loops_over_parameters_and_gives_the_same_numbers(name):
    """foreach=False (and reference mode, by default) runs _update once per parameter, with the
    parameter's own shape: what a reader steps into. The numbers equal the flat update's."""
    grads = [np.random.default_rng(i).standard_normal(s) for i, s in enumerate(FLAT_SHAPES)]
    results = []
    for foreach, reference in ((True, False), (False, False), (None, True)):
        params = make_params(dtype=np.float32, shapes=FLAT_SHAPES)
        opt = OPTIMIZERS[name](params)
        opt.foreach = foreach
        calls = count_updates(opt)
        with tm.reference_mode(reference):
            for _ in range(3):
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.astype(np.float32)
                opt.step()
        per_parameter = foreach is False or reference
        assert len(calls) == (3 * len(params) if per_parameter else 3)
        results.append([p.data.copy() for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
