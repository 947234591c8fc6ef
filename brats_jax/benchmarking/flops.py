"""FLOPs per slice of the models from XLA's cost analysis.

usage: python -m brats_jax.benchmarking.flops [--image_size=240] [--batch_size=1] [--markdown]

Numbers come from ``jax.jit(f).lower(...).compile().cost_analysis()["flops"]`` on the local
backend, divided by the batch size. "forward" is an eval-mode forward pass; "train step" is
the loss (mean softmax cross-entropy), its gradient w.r.t. all parameters in train mode and an
SGD-style parameter update (``p - 1e-4 * g``; an Adam update adds ~10 FLOPs per parameter).
XLA counts a multiply-add as 2 FLOPs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from brats_jax import cli, losses
from brats_jax.benchmarking.workload import mean_ce
from brats_jax.models import create_model


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):
        ca = ca[0]
    return float(ca["flops"])


def flops_per_slice(
    model, image_size: int = 240, *, in_channels: int = 4, batch_size: int = 1
) -> dict[str, float]:
    """XLA FLOPs per (image_size x image_size x in_channels) slice for one flax model.

    Returns ``{"forward": float, "train_step": float, "params": int}`` (FLOPs per slice,
    parameter count). Nothing is executed: models are initialised abstractly (jax.eval_shape)
    and the functions only lowered and compiled.
    """
    x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, in_channels), jnp.float32)
    y = jax.ShapeDtypeStruct((batch_size, image_size, image_size), jnp.int32)
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(
        lambda: model.init(
            {"params": key, "dropout": key},
            jnp.zeros((1, image_size, image_size, in_channels)),
            train=False,
        )
    )
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def forward(variables, x):
        return model.apply(variables, x, train=False)

    def train_step(params, rest, x, y, rng):
        def loss_fn(p):
            logits, _ = model.apply(
                {"params": p, **rest}, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
            )
            return losses.output_loss(mean_ce, logits, y, None)  # deep supervision: summed

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, jax.tree_util.tree_map(lambda p, g: p - 1e-4 * g, params, grads)

    fwd = jax.jit(forward).lower(variables, x).compile()
    step = jax.jit(train_step).lower(params, rest, x, y, key).compile()
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    return {
        "forward": _flops(fwd) / batch_size,
        "train_step": _flops(step) / batch_size,
        "params": n_params,
    }


def main(argv=None) -> None:
    """Print forward / train-step GFLOPs per slice of UNet and TransUNet."""
    ap = cli.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image_size", type=int, default=240)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--models", default="unet,transunet")
    args = ap.parse_args(argv)
    print(
        f"backend: {jax.default_backend()}, image {args.image_size}x{args.image_size}x4, "
        f"batch {args.batch_size}"
    )
    print("| model | parameters | forward GFLOPs/slice | train-step GFLOPs/slice | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        r = flops_per_slice(create_model(name), args.image_size, batch_size=args.batch_size)
        print(
            f"| {name} | {r['params']:,} | {r['forward'] / 1e9:.1f} | "
            f"{r['train_step'] / 1e9:.1f} | {r['train_step'] / r['forward']:.2f} |"
        )


if __name__ == "__main__":
    main()
