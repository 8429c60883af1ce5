"""Train ``examples/mynet.py:Net`` on Fashion-MNIST and save its state_dict to ``examples/mynet.pt``.

This is the user's side of the story (any training code would do); moco's examples then compress it::

    python examples/train_mynet.py                # 2 epochs on 60,000 images, a few minutes on 2 cores
    moco run examples/prune.toml
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mynet import Net  # noqa: E402

from moco.specs import resolve_data  # noqa: E402
from moco.train import evaluate, fit  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion_mnist:train")
    ap.add_argument("--test", default="fashion_mnist:test")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "mynet.pt"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train = resolve_data(args.data, split="train").subset(args.train_size, args.seed)
    test = resolve_data(args.test, split="test")
    torch.manual_seed(args.seed)
    model = Net(width=args.width, in_channels=train.input_shape[0], num_classes=max(10, train.num_classes))
    fit(model, train.tensors(), epochs=args.epochs, lr=2e-3, schedule="cosine", seed=args.seed,
        progress=sys.stderr.isatty())
    acc = evaluate(model, test.tensors()).accuracy
    torch.save(model.state_dict(), args.out)
    print(f"test accuracy {acc:.4f}; weights: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
