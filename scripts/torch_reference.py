#!/usr/bin/env python3
"""The same LeNet-5 and recipe in PyTorch, to check lenet against and to time side by side.

    # parity: train the same steps from the same weights on the same batches, then compare
    lenet train --backend cpu --no-shuffle --steps 20 --init init.safetensors --save ours.safetensors
    python3 scripts/torch_reference.py train --init init.safetensors --steps 20 --save torch.safetensors
    python3 scripts/torch_reference.py compare ours.safetensors torch.safetensors

    # evaluation of a lenet checkpoint in PyTorch
    python3 scripts/torch_reference.py eval --weights ours.safetensors

    # the default recipe (shuffled, batch 256, Adam 1e-3): test accuracy after each epoch
    python3 scripts/torch_reference.py recipe --epochs 1 --seed 0

    # PyTorch's CPU training speed at batch 256 (images/s)
    python3 scripts/torch_reference.py speed

Needs torch, safetensors and numpy (pip install torch safetensors numpy). Not used by the tests.
"""

import argparse
import gzip
import os
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "mnist")


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def idx(name):
    with gzip.open(os.path.join(DATA, name + ".gz")) as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 0x803:
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, 1, 28, 28)
    return np.frombuffer(data, np.uint8, offset=8)


def mnist(split):
    prefix = "train" if split == "train" else "t10k"
    images = torch.from_numpy(idx(f"{prefix}-images.idx3-ubyte").astype(np.float32) / 255.0)
    labels = torch.from_numpy(idx(f"{prefix}-labels.idx1-ubyte").astype(np.int64))
    return images, labels


def model_from(path):
    model = LeNet5()
    tensors = load_file(path)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("adam.")})
    return model


def train(args):
    model = model_from(args.init)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    images, labels = mnist("train")
    b = args.batch
    for step in range(args.steps):
        i = step % (len(labels) // b)  # --no-shuffle: batch i is samples i*B .. (i+1)*B
        loss = F.cross_entropy(model(images[i * b:(i + 1) * b]), labels[i * b:(i + 1) * b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step + 1} loss {loss.item():.6f}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.save)


def evaluate(args):
    model = model_from(args.weights)
    images, labels = mnist("test")
    with torch.no_grad():
        logits = model(images)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    print(f"accuracy {100 * accuracy:.2f}% ({int(round(accuracy * len(labels)))}/{len(labels)}), loss {loss:.4f}")


def recipe(args):
    torch.manual_seed(args.seed)
    model = LeNet5()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = mnist("train")
    test_images, test_labels = mnist("test")
    b = args.batch
    for epoch in range(args.epochs):
        perm = torch.randperm(len(labels))
        for i in range(len(labels) // b):
            idx = perm[i * b:(i + 1) * b]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
        print(f"epoch {epoch + 1}: test accuracy {100 * accuracy:.2f}%", flush=True)


def compare(args):
    a, b = load_file(args.a), load_file(args.b)
    worst = 0.0
    for name, x in b.items():
        y = a[name]
        diff = (x - y).abs().max().item()
        rel = diff / max(x.abs().max().item(), 1e-12)
        worst = max(worst, rel)
        print(f"{name:14} max |diff| {diff:.3e}  relative to max |w| {rel:.3e}")
    print(f"worst relative difference {worst:.3e}")


def speed(args):
    torch.manual_seed(0)
    model = LeNet5()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = mnist("train")
    b = args.batch
    times = []
    for step in range(args.steps):
        i = step % (len(labels) // b)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(images[i * b:(i + 1) * b]), labels[i * b:(i + 1) * b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    median = sorted(times[5:])[len(times[5:]) // 2]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}: "
          f"{1e3 * median:.2f} ms/step, {b / median:.0f} images/s (median of {len(times) - 5} steps)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--init", required=True)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--save", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--weights", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    r = sub.add_parser("recipe", help="the default recipe with shuffling, test accuracy per epoch")
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--batch", type=int, default=256)
    r.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("speed")
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    {"train": train, "eval": evaluate, "compare": compare, "recipe": recipe, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    main()
