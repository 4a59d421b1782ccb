"""The CUDA path: the same numbers as the CPU, bf16 autocast training, a CPU run resumed on a GPU.

Skipped where there is no GPU (CI has none); run on a GPU machine with
`python -m pytest -o addopts= tests/test_cuda.py`.
"""
from __future__ import annotations

import pytest
import torch

from glom_mnist import Glom, GlomConfig
from glom_mnist.train import Trainer
from test_train import synthetic, tiny_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def exact_cuda():
    """fp32 convolutions and matrix products on the GPU (no TF32), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("preset", ["seed", "consensus"])
def test_cuda_rollout_equals_the_cpu_one(preset, exact_cuda):
    torch.manual_seed(0)
    cpu = Glom(GlomConfig.preset(preset, init_noise=0.0, height=12, width=10)).eval()
    gpu = Glom(cpu.cfg).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    images = torch.randn(3, 1, 12, 10)
    with torch.no_grad():
        want = cpu(images, return_all=True)
        got = gpu(images.cuda(), return_all=True)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(gpu.predict(images.cuda()).cpu(), cpu.predict(images))


@pytest.mark.parametrize("preset", ["seed", "consensus"])
def test_bf16_autocast_training_learns_in_fp32_weights(tmp_path, preset):
    trainer = Trainer(tiny_cfg(tmp_path, "amp", preset=preset, device="cuda", amp=True,
                               iterations=4), *synthetic())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit(progress=False)
    assert summary["finished"] and all(torch.isfinite(torch.tensor(r["loss"]))
                                       for r in trainer.log)
    after = trainer.model.state_dict()
    assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_cpu_run_resumes_on_the_gpu(tmp_path):
    Trainer(tiny_cfg(tmp_path, "r", iterations=2), *synthetic()).fit(progress=False)
    resumed = Trainer(tiny_cfg(tmp_path, "r", device="cuda", iterations=4), *synthetic(),
                      resume=tmp_path / "r" / "last.pt")
    assert resumed.iteration == 2
    summary = resumed.fit(progress=False)
    assert summary["iterations"] == 4
    states = [s for state in resumed.optimizer.state.values() for s in state.values()
              if isinstance(s, torch.Tensor) and s.dim() > 0]
    assert states and all(s.device.type == "cuda" for s in states)


def test_a_training_step_with_dropout_on_the_gpu_equals_the_cpus_with_the_same_masks(
        exact_cuda, monkeypatch):
    """Dropout (here dropping nothing, so that both devices draw the same) on the networks'
    inputs, Q and K: a training step's loss and gradients on CUDA equal the CPU's; with real
    dropout the step runs and its gradients are finite."""
    import torch.nn.functional as F

    from glom_mnist import kernels

    torch.manual_seed(0)
    cfg = GlomConfig.preset("seed", height=8, width=7, steps=4, dropout=0.2, noise=0.0)
    cpu = Glom(cfg).train()
    gpu = Glom(cfg).cuda().train()
    gpu.load_state_dict(cpu.state_dict())
    images, target = torch.randn(3, 1, 8, 7), torch.rand(3, 10, 8, 7)
    init = cpu.initial_state(images)
    with monkeypatch.context() as patch:
        # gaps so long that nothing is dropped, on both devices and in the compiled CPU path
        patch.setattr(kernels, "_gap_table", lambda p, device: torch.full(
            (2**16,), 2**30, dtype=torch.int64, device=device))
        for model, device in ((cpu, "cpu"), (gpu, "cuda")):
            top = model.rollout(init.to(device), cfg.steps)[:, -1]
            F.mse_loss(top, target.to(device)).backward()
    for name, p in cpu.named_parameters():
        assert torch.allclose(gpu.get_parameter(name).grad.cpu(), p.grad, atol=1e-5, rtol=1e-4), name
    gpu.zero_grad()
    top = gpu(images.cuda())[:, -1]
    F.mse_loss(top, target.cuda()).backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters())
