"""The training recipe: rate schedules with warmup, batch scaling, no decay on BatchNorm and
biases, gradient clipping, bf16 autocast, torch.compile, and the recipe a resume must share.

Resuming under a schedule bit for bit is tests/test_resume.py's (its runs use one)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cluster_pipeline.config import Config, ConfigError, OptimConfig, load_config
from cluster_pipeline.models.nets import build_model
from cluster_pipeline.training.recipe import (
    base_lrs,
    check_recipe,
    lr_factor,
    make_optimizer,
    recipe_of,
    set_lr,
)
from cluster_pipeline.training.step import train_step

DIGITS = "configs/digits_test.yaml"


def model_and_batch(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg.model, 1, 10)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    return model, x, y


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_warmup_is_linear_to_the_rate_at_its_last_step() -> None:
    o = OptimConfig(warmup_epochs=1.0)
    assert [lr_factor(o, 3, 0, s, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(o, 3, 1, 0, 4) == 1.0 and lr_factor(o, 3, 2, 3, 4) == 1.0
    half = OptimConfig(warmup_epochs=0.5)  # fractions of an epoch
    assert [lr_factor(half, 3, 0, s, 4) for s in range(3)] == [0.5, 1.0, 1.0]


def test_step_schedule_multiplies_by_gamma_at_each_milestone() -> None:
    o = OptimConfig(schedule="step", milestones=[2, 4], gamma=0.1)
    got = [lr_factor(o, 6, e, 3, 5) for e in range(6)]
    assert got == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01], rel=1e-12)


def test_cosine_falls_from_the_rate_to_its_floor_after_the_warmup() -> None:
    o = OptimConfig(schedule="cosine", warmup_epochs=1.0, final_lr_factor=0.1)
    steps, epochs = 10, 5
    assert lr_factor(o, epochs, 1, 0, steps) == pytest.approx(1.0)  # the warmup's end
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_factor(o, epochs, 3, 0, steps) == pytest.approx(mid)  # halfway through 1..5
    rates = [lr_factor(o, epochs, e, s, steps) for e in range(1, epochs) for s in range(steps)]
    assert all(a >= b for a, b in itertools.pairwise(rates))  # never rises
    assert rates[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))


def test_rate_scales_with_the_global_batch_when_asked() -> None:
    o = OptimConfig(lr=0.1, head_lr=0.2, base_batch_size=256)
    assert base_lrs(o, 4096) == (0.1, 0.2)
    o.scale_lr_with_batch = True
    assert base_lrs(o, 4096) == pytest.approx((1.6, 3.2))
    cfg = Config()
    cfg.optim = o
    model, _, _ = model_and_batch(cfg)
    opt = make_optimizer(model, cfg, 512)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.4])
    assert set_lr(opt, 0.5) == pytest.approx(0.1) and opt.param_groups[1]["lr"] == 0.2


def test_the_head_can_step_without_momentum_as_deepclusters_code() -> None:
    cfg = load_config(DIGITS, ["optim.head_momentum=0", "optim.momentum=0.9"])
    model, x, y = model_and_batch(cfg)
    opt = make_optimizer(model, cfg, 16)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.0]
    train_step(model, opt, x, y)
    assert all("momentum_buffer" not in opt.state[p] or opt.state[p]["momentum_buffer"] is None
               for p in model.head.parameters())  # fmt: skip
    assert all(opt.state[p]["momentum_buffer"] is not None for p in opt.param_groups[0]["params"])


def test_no_weight_decay_on_batchnorm_and_biases() -> None:
    cfg = load_config(DIGITS, ["optim.no_decay_bn_bias=true", "optim.weight_decay=0.1"])
    model, _, _ = model_and_batch(cfg)
    opt = make_optimizer(model, cfg, 64)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, trainable))  # each once
    for g in opt.param_groups:
        one_dim = {p.ndim <= 1 for p in g["params"]}
        assert one_dim == {g["weight_decay"] == 0.0}, g["weight_decay"]
    # With zero gradients only weight decay moves a weight: matrices shrink, the rest stays.
    before = params(model)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (p.ndim > 1), name
    assert any("bn" in n or ".1." in n for n, p in model.named_parameters() if p.ndim == 1)


def test_gradient_clipping_bounds_the_step() -> None:
    cfg = load_config(DIGITS, ["optim.weight_decay=0", "optim.momentum=0"])
    for clip in (0.0, 1e-3):
        model, x, y = model_and_batch(cfg)
        opt = make_optimizer(model, cfg, 16)
        before = params(model)
        train_step(model, opt, x * 50, y, clip_grad_norm=clip)
        moved = torch.sqrt(sum(((p - before[n]) ** 2).sum() for n, p in model.named_parameters()))
        lr = cfg.optim.lr
        if clip:
            assert moved <= lr * clip * 1.0001, (moved, lr * clip)
        else:
            assert moved > lr * 1e-2  # the same batch unclipped moves far more


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights() -> None:
    cfg = load_config(DIGITS)
    results = []
    for bf16 in (False, True):
        model, x, y = model_and_batch(cfg)
        opt = make_optimizer(model, cfg, 16)
        results.append(train_step(model, opt, x, y, bf16=bf16)[0].item())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(torch.isfinite(p).all() for p in model.parameters())
    fp32, bf16 = results
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=0.05)  # rounded, not broken


def test_compiled_network_trains_as_the_eager_one() -> None:
    import torch._dynamo

    cfg = load_config(DIGITS)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = []
    for compiled in (False, True):
        model, x, y = model_and_batch(cfg)
        opt = make_optimizer(model, cfg, 16)
        net = torch.compile(model, backend="aot_eager") if compiled else model
        for _ in range(2):
            train_step(net, opt, x, y)
        out.append(params(model))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], rtol=1e-5, atol=1e-6)


def test_a_resume_under_another_recipe_is_refused_naming_the_values() -> None:
    cfg = load_config(DIGITS, ["optim.schedule=cosine"])
    saved = recipe_of(cfg, on_cuda=False)
    check_recipe(saved, recipe_of(cfg, on_cuda=False), "runs/r")  # the same recipe resumes
    other = load_config(DIGITS, ["optim.schedule=step", "optim.lr=0.1"])
    with pytest.raises(ConfigError) as info:
        check_recipe(saved, recipe_of(other, on_cuda=False), "runs/r")
    msg = str(info.value)
    assert "runs/r" in msg and "optim.lr=0.05 (now 0.1)" in msg
    assert "optim.schedule='cosine' (now 'step')" in msg
    longer = load_config(DIGITS, ["optim.schedule=cosine", "train.epochs=9"])
    assert saved == recipe_of(longer, on_cuda=False)  # more epochs: the same recipe
    # bf16 acts only on CUDA: a CPU checkpoint resumes on CPU whatever train.bf16 says.
    assert recipe_of(cfg, on_cuda=False)["train.bf16"] is False
    assert recipe_of(cfg, on_cuda=True)["train.bf16"] is True


def test_a_checkpoint_from_before_the_recipe_resumes_only_without_its_options() -> None:
    plain = load_config(DIGITS)
    check_recipe(None, recipe_of(plain, on_cuda=False), "runs/old")
    check_recipe(None, recipe_of(load_config(DIGITS, ["optim.lr=0.2"]), False), "runs/old")
    clipped = load_config(DIGITS, ["optim.clip_grad_norm=1.0"])
    with pytest.raises(ConfigError, match=r"optim\.clip_grad_norm=0\.0 \(now 1\.0\)"):
        check_recipe(None, recipe_of(clipped, on_cuda=False), "runs/old")
    with pytest.raises(ConfigError, match=r"train\.bf16=False \(now True\)"):
        check_recipe(None, recipe_of(plain, on_cuda=True), "runs/old")  # the old code: fp32


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.schedule=linear", "optim.schedule='linear' is unknown"),
        ("optim.milestones=[5,3]", "optim.milestones=[5, 3] must be increasing"),
        ("optim.gamma=0", "optim.gamma=0.0 must be in (0, 1]"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0 must be >= 0"),
        ("optim.clip_grad_norm=-1", "optim.clip_grad_norm must be >= 0"),
        ("train.compile_backend=tvm", "train.compile_backend='tvm' is unknown"),
        ("wandb.log_every_steps=-1", "wandb.log_every_steps must be >= 0"),
    ],
)
def test_bad_recipe_values_are_one_clear_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, [override])
    assert message in str(info.value) and "\n" not in str(info.value)
