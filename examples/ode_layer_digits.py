"""An ODE layer inside an MLP and inside a small CNN, trained to classify 8x8 digit images.

The seed's two architectures with an ODE as one of the layers (``dl.NeuralODE``: x -> x(1)
for dx/dt = g(x), g = Linear(32, 32) -> tanh, solved by tsit5 and differentiated in reverse
mode):

* MLP: flatten 64 pixels -> Linear(64, 32) -> tanh -> ODE layer -> Linear(32, 10).
* CNN: Conv(1 -> 16, 3x3) -> ReLU -> max-pool -> Conv(16 -> 8, 3x3) -> ReLU -> max-pool ->
  flatten (8 x 2 x 2 = 32) -> ODE layer, whose initial condition is thus produced by the
  convolutions -> Linear(32, 10).

Data: scikit-learn's bundled digits (``sklearn.datasets.load_digits``: 1797 images of 8x8 pixels,
no download), split 75% / 25% into train and test sets, stratified. Adam with cross-entropy
and a cosine learning-rate decay.

Prints per epoch the training loss and the train and test accuracy, then the test accuracy of
each model; writes digits_training.png (loss and test accuracy per epoch for both models).

    python examples/ode_layer_digits.py                          # full run
    python examples/ode_layer_digits.py --epochs 1 --train-size 300   # a quick smoke run
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch
from _common import DEFAULT_OUT_DIR, pyplot, save_figure
from torch import nn

import diffeqlayers as dl

ODE_DIM = 32


def ode_layer(rtol: float, atol: float) -> dl.NeuralODE:
    """x -> x(1) for dx/dt = tanh(W x + b) on a 32-dimensional state."""
    rhs = nn.Sequential(nn.Linear(ODE_DIM, ODE_DIM), nn.Tanh())
    return dl.NeuralODE(rhs, tspan=(0.0, 1.0), solver="tsit5", sensealg="rd", rtol=rtol, atol=atol)


def make_mlp(rtol: float, atol: float) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, ODE_DIM),
        nn.Tanh(),
        ode_layer(rtol, atol),
        nn.Linear(ODE_DIM, 10),
    )


def make_cnn(rtol: float, atol: float) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),  # [B, 16, 8, 8]
        nn.ReLU(),
        nn.MaxPool2d(2),  # [B, 16, 4, 4]
        nn.Conv2d(16, 8, kernel_size=3, padding=1),  # [B, 8, 4, 4]
        nn.ReLU(),
        nn.MaxPool2d(2),  # [B, 8, 2, 2]
        nn.Flatten(),  # [B, 32]: the ODE's initial condition
        ode_layer(rtol, atol),
        nn.Linear(ODE_DIM, 10),
    )


MODELS = {"mlp": make_mlp, "cnn": make_cnn}


def load_data(
    train_size: Optional[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images as [N, 1, 8, 8] float32 in [0, 1] and labels; ``train_size`` keeps that many of
    the training images (all when None). The test set is always the full 25% split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, stratify=digits.target, random_state=seed
    )
    if train_size is not None:
        idx_train = idx_train[:train_size]
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train(
    name: str,
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
) -> dict[str, list[float]]:
    """Adam (cosine learning-rate decay) on cross-entropy; returns the per-epoch training loss
    and train/test accuracy."""
    x_train, y_train, x_test, y_test = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0.05 * lr)
    loss_fn = nn.CrossEntropyLoss()
    history: dict[str, list[float]] = {"loss": [], "train_acc": [], "test_acc": []}
    n = len(y_train)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n)
        total = 0.0
        for i in range(0, n, batch_size):
            batch = order[i : i + batch_size]
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        sched.step()
        history["loss"].append(total / n)
        history["train_acc"].append(accuracy(model, x_train, y_train))
        history["test_acc"].append(accuracy(model, x_test, y_test))
        print(
            f"[{name}] epoch {epoch:3d}  loss {history['loss'][-1]:.4f}  "
            f"train acc {history['train_acc'][-1]:.4f}  test acc {history['test_acc'][-1]:.4f}  "
            f"({time.perf_counter() - start:5.1f} s)",
            flush=True,
        )
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument(
        "--train-size", type=int, default=None, help="use only this many training images"
    )
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to train"
    )
    parser.add_argument("--rtol", type=float, default=1e-3, help="ODE layer tolerance")
    parser.add_argument("--atol", type=float, default=1e-4, help="ODE layer tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT_DIR, help="folder for the PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small batches: threads only add overhead on a shared machine

    data = load_data(args.train_size, args.seed)
    print(f"digits: {len(data[1])} training and {len(data[3])} test images of 8x8 pixels")

    histories: dict[str, dict[str, list[float]]] = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        model = MODELS[name](args.rtol, args.atol)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[{name}] {n_params} parameters")
        start = time.perf_counter()
        histories[name] = train(name, model, data, args.epochs, args.batch_size, args.lr)
        seconds = time.perf_counter() - start
        print(
            f"[{name}] test accuracy: {histories[name]['test_acc'][-1]:.4f} "
            f"(chance 0.1; {seconds:.1f} s for {args.epochs} epochs)"
        )

    plt = pyplot()
    if plt is None:
        return
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (name, hist) in enumerate(histories.items()):
        epochs = range(1, len(hist["loss"]) + 1)
        color = f"C{k}"
        ax_loss.plot(epochs, hist["loss"], "o-", ms=3, color=color, label=name.upper())
        ax_acc.plot(
            epochs, hist["test_acc"], "o-", ms=3, color=color, label=f"{name.upper()}, test"
        )
        ax_acc.plot(epochs, hist["train_acc"], ":", color=color, label=f"{name.upper()}, train")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training cross-entropy")
    ax_loss.set_title("Training loss")
    ax_loss.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("Accuracy on the digits (8x8)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("An ODE layer (dl.NeuralODE) inside an MLP and a CNN")
    save_figure(fig, args.out, "digits_training.png")


if __name__ == "__main__":
    main()
