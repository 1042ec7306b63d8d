"""The shared training loop: it learns, logs, checkpoints, and resumes to the same weights."""

import json

import numpy as np
import pytest

import tinymm as tm
from tinymm import functional as F
from tinymm import nn, optim
from tinymm.data import batches
from tinymm.train import fit, lesson_args, result_line


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return x, y


def _model(seed=0):
    tm.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.2), nn.Linear(16, 2))


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y), float((logits.data.argmax(-1) == y).mean())


def _run(steps, checkpoint=None, checkpoint_every=0, resume=False, model=None, log=None):
    model = model or _model()
    opt = optim.AdamW(model.parameters(), lr=0.05)
    history = fit(
        model,
        opt,
        _loss,
        _problem(),
        steps=steps,
        batch_size=32,
        seed=3,
        lr=lambda s: optim.cosine_schedule(s, 40, 4, 0.05),
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        log=log or (lambda s: None),
    )
    return model, history


def test_fit_learns_and_logs_progress():
    lines = []
    model, history = _run(40, log=lines.append)
    assert np.mean(history.loss[-5:]) < 0.5 * history.loss[0]
    assert len(history.step) == 40 and history.step[-1] == 40
    last = lines[-1]
    for part in ("step 40/40", "loss", "acc", "steps/s", "elapsed", "eta"):
        assert part in last, (part, last)


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full, _ = _run(40)
    ckpt = tmp_path / "ckpt.npz"
    _run(24, checkpoint=ckpt, checkpoint_every=12)  # "crashes" after step 24
    resumed, history = _run(
        40, checkpoint=ckpt, checkpoint_every=12, resume=True, model=_model(seed=99)
    )  # different init: must be overwritten
    assert history.step[0] == 25
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def _noisy_run(steps, ckpt, resume, generators=True):
    """A loss that draws from a generator of its own (as diffusion draws its noise)."""
    model, noise = _model(), np.random.default_rng(7)

    def loss(model, x, y):
        return F.cross_entropy(model(x + noise.standard_normal(x.shape).astype(x.dtype)), y)

    opt = optim.AdamW(model.parameters(), lr=0.05)
    fit(model, opt, loss, _problem(), steps=steps, batch_size=32, seed=3, checkpoint=ckpt,
        checkpoint_every=12, resume=resume, log=lambda s: None,
        generators=(noise,) if generators else ())  # fmt: skip
    return model


def test_resume_restores_the_generators_the_loss_draws_from(tmp_path):
    full = _noisy_run(40, tmp_path / "full.npz", resume=False)
    ckpt = tmp_path / "ckpt.npz"
    _noisy_run(24, ckpt, resume=False)  # "crashes" after step 24
    resumed = _noisy_run(40, ckpt, resume=True)  # a new generator, seeded as at the start
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    with pytest.raises(ValueError, match="states of 1 generators, but generators= gives 0"):
        _noisy_run(40, ckpt, resume=True, generators=False)


def test_after_step_runs_after_each_optimizer_step():
    model = _model()
    seen = []

    def clamp(done):  # sees the weights the step just wrote, and may change them
        seen.append((done, model[0].weight.data.copy()))
        np.clip(model[0].weight.data, -0.05, 0.05, out=model[0].weight.data)

    opt = optim.SGD(model.parameters(), lr=0.5)
    fit(model, opt, _loss, _problem(), steps=5, batch_size=32, after_step=clamp, log=lambda s: None)
    assert [d for d, _ in seen] == [1, 2, 3, 4, 5]
    assert not np.array_equal(seen[0][1], seen[1][1])  # called after the step, not before
    assert np.abs(seen[-1][1]).max() > 0.05  # the step left the range ...
    assert np.abs(model[0].weight.data).max() <= 0.05  # ... and the hook's clamp stuck


def test_batch_stream_covers_each_epoch_once():
    x = np.arange(10)
    seen = np.concatenate(
        [b for (b,) in batches([x], 3, shuffle=True, rng=np.random.default_rng(0))]
    )
    assert sorted(seen) == list(range(10))
    with pytest.raises(ValueError, match="differ in length"):
        next(batches([x, x[:5]], 2))


def test_result_line_is_one_json_line(capsys):
    line = result_line({"test_accuracy": np.float32(0.98766)}, seconds=12.345, seed=7)
    assert capsys.readouterr().out.strip() == line
    payload = json.loads(line[len("result: ") :])
    assert payload == {"test_accuracy": 0.9877, "seconds": 12.3, "seed": 7}


def test_lesson_args_defaults(tmp_path):
    args = lesson_args("xx", "doc", ["--quick", "--seed", "3", "--out", str(tmp_path / "o")])
    assert args.quick and args.seed == 3 and args.steps is None and (tmp_path / "o").is_dir()


def test_in_batches_equals_one_big_call_and_records_no_graph():
    from tinymm.train import in_batches

    model = _model()
    x, _ = _problem()
    model.eval()
    whole = model(x).data
    seen = []

    def fn(chunk):
        out = model(chunk)
        seen.append((len(chunk), out.requires_grad))
        return out

    np.testing.assert_allclose(in_batches(fn, x, batch_size=64), whole, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in seen] == [64, 64, 64, 8]
    assert not any(grad for _, grad in seen)
