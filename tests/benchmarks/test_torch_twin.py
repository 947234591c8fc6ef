"""benchmarks/: the PyTorch twin computes what brats_jax's U-Net and train step compute, and the
CPU comparison script runs in both modes. Skipped without torch (an optional extra)."""

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from benchmarks import compare_cpu  # noqa: E402
from benchmarks.torch_unet import TorchUNet, make_train_step  # noqa: E402
from brats_jax.benchmarking import workload  # noqa: E402

F = 4  # base features of the small twin pair


def _load_jax_params(tmodel, params) -> None:
    """Copies brats_jax U-Net parameters (HWIO kernels) into the twin (OIHW / IOHW)."""

    def conv(m, p):
        m.weight.data = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
        m.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())

    names = [f"down_{i}" for i in range(4)] + ["bottleneck"]
    for block, name in zip(tmodel.down, names, strict=True):
        conv(block[0], params[name]["conv1"])
        conv(block[2], params[name]["conv2"])
    for k, (up, block) in enumerate(zip(tmodel.ups, tmodel.up_convs, strict=True)):
        i = 3 - k
        p = params[f"upconv_{i}"]
        up.weight.data = torch.from_numpy(np.asarray(p["kernel"]).transpose(2, 3, 0, 1).copy())
        up.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
        conv(block[0], params[f"up_{i}"]["conv1"])
        conv(block[2], params[f"up_{i}"]["conv2"])
    conv(tmodel.head, params["head"])


def _twin_kernels(tmodel) -> dict:
    """Some of the twin's weights, back in brats_jax's HWIO layout."""

    def hwio(m):
        return m.weight.detach().numpy().transpose(2, 3, 1, 0)

    return {
        "down_0/conv1": hwio(tmodel.down[0][0]),
        "upconv_2": tmodel.ups[1].weight.detach().numpy().transpose(2, 3, 0, 1),
        "head": hwio(tmodel.head),
    }


def test_twin_forward_and_adam_step_match_brats_jax():
    net = workload.build_model("unet", base_features=F, conv_impl="xla")
    tx = optax.adam(1e-4)
    state = workload.init_train_state(net, 32, tx)
    image, label = workload.random_batch(2, 32)
    tmodel = TorchUNet(base_features=F)
    _load_jax_params(tmodel, jax.device_get(state["params"]))

    logits = net.apply({"params": state["params"]}, image)
    tlogits = tmodel(torch.from_numpy(np.array(image)).permute(0, 3, 1, 2))
    np.testing.assert_allclose(
        tlogits.detach().numpy().transpose(0, 2, 3, 1), np.asarray(logits), atol=1e-4, rtol=1e-4
    )

    new_state, loss = jax.jit(workload.make_train_step(net, tx))(state, image, label)
    tloss = make_train_step(tmodel)(
        torch.from_numpy(np.array(image)), torch.from_numpy(np.asarray(label).astype(np.int64))
    )
    np.testing.assert_allclose(float(tloss), float(loss), rtol=1e-5)
    got = _twin_kernels(tmodel)
    p, p0 = jax.device_get(new_state["params"]), jax.device_get(state["params"])
    # Adam's first step moves every weight by ~lr = 1e-4; agreement to 1e-6 shows the same update.
    for name, new, old in [
        ("down_0/conv1", p["down_0"]["conv1"]["kernel"], p0["down_0"]["conv1"]["kernel"]),
        ("upconv_2", p["upconv_2"]["kernel"], p0["upconv_2"]["kernel"]),
        ("head", p["head"]["kernel"], p0["head"]["kernel"]),
    ]:
        assert np.abs(new - old).max() > 5e-5  # the step did move it
        np.testing.assert_allclose(got[name], new, atol=1e-6)


@pytest.mark.parametrize("processes", [0, 1])
def test_compare_cpu_runs_in_both_modes(processes):
    res = compare_cpu.main(
        [
            "--image-size=32",
            "--batch-size=1",
            "--steps=1",
            f"--base-features={F}",
            "--impls=cpu_fast",
            "--xla-flags=none",  # conftest set them before JAX started
            f"--processes={processes}",
        ]
    )
    assert res["torch_step_s_median"] > 0
    r = res["cpu_fast"]
    assert r["step_s_median"] > 0
    # step times are printed with 4 decimals (~1e-3 s here): compare within that rounding.
    want = r["step_s_median"] / res["torch_step_s_median"]
    assert r["ratio_median"] == pytest.approx(want, rel=0.1)
    assert r["flops_per_step"] > 0
