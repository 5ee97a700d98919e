"""The PyTorch side of benchmarks/conv_speed.py: ConvNet-3 forward and training step on CPU.

The same network as idm_jax.models.ConvNet (depth 3, width 128, instance norm as
GroupNorm with one group per channel, ReLU, 2x2 average pooling, linear
2048 -> 10; the release's network as docs/RELEASE.md#networks describes it) and
the same measurements: one forward pass (no gradient) and one training step
(cross-entropy, backward, SGD momentum 0.9) on a random batch, median of
--repeats runs after --warmup, in milliseconds. It measures what PyTorch's
own CPU kernels (oneDNN) do on this machine, so that the JAX figures have a
measured comparison rather than one inferred from the release's times.

PyTorch is not a dependency of idm_jax; run this in an environment that has it:

  python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
  /tmp/torchenv/bin/python benchmarks/torch_conv_speed.py --batch=256 --repeats=5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn


def convnet3(num_classes: int = 10, channels: int = 3, width: int = 128) -> nn.Sequential:
    """ConvNet-3 for 32x32 inputs; 320,010 parameters with the defaults."""
    layers: list[nn.Module] = []
    in_channels = channels
    for _ in range(3):
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                   nn.ReLU(), nn.AvgPool2d(2, 2)]
        in_channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * 4 * 4, num_classes))


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = convnet3()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 320_010, n_params  # the same network as the JAX ConvNet-3
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def forward():
        with torch.no_grad():
            model(x)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    load_before = os.getloadavg()[0]
    forward_ms = median_ms(forward, args.repeats, args.warmup)
    train_ms = median_ms(train_step, args.repeats, args.warmup)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, mkldnn "
          f"{torch.backends.mkldnn.is_available()}, {platform.processor() or platform.machine()}, "
          f"load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| arch | batch | forward (ms) | training step (ms) |")
    print("|---|---:|---:|---:|")
    print(f"| ConvNet-3 (PyTorch) | {args.batch} | {forward_ms:.0f} | {train_ms:.0f} |")


if __name__ == "__main__":
    main()
