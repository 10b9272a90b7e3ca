#!/usr/bin/env python3
"""The same LeNet-5 and recipe in PyTorch, to check lenet against and to time side by side.

    # parity: train the same steps from the same weights on the same batches, then compare
    lenet train --backend cpu --no-shuffle --steps 20 --init init.safetensors --save ours.safetensors
    python3 scripts/torch_reference.py train --init init.safetensors --steps 20 --save torch.safetensors
    python3 scripts/torch_reference.py compare ours.safetensors torch.safetensors

    # the same with the second-round options (each as lenet train names it)
    python3 scripts/torch_reference.py train --init init.safetensors --steps 20 --save torch.safetensors \\
        --optimizer sgd --lr 0.05 --momentum 0.9 --nesterov --weight-decay 5e-4 \\
        --lr-schedule onecycle --augment-shift 2 --seed 0 --val 5000

    # evaluation of a lenet checkpoint in PyTorch
    python3 scripts/torch_reference.py eval --weights ours.safetensors

    # the default recipe (shuffled, batch 256, Adam 1e-3): test accuracy after each epoch
    python3 scripts/torch_reference.py recipe --epochs 1 --seed 0
    # a recipe with the second-round options, e.g. OneCycle to 4e-3, batch 128, shifts of 2 pixels
    python3 scripts/torch_reference.py recipe --epochs 5 --batch 128 --lr 4e-3 --lr-schedule onecycle \\
        --augment-shift 2 --val 5000
    # time to 99% test accuracy
    python3 scripts/torch_reference.py recipe --epochs 2 --batch 64 --lr 4e-3 --lr-schedule onecycle \\
        --augment-shift 1 --until 99

    # PyTorch's CPU training speed at batch 256 (images/s); --device cuda on a GPU machine
    python3 scripts/torch_reference.py speed
    python3 scripts/torch_reference.py --device cuda recipe --epochs 10

    # the learning rate (and Adam beta1 or SGD momentum) torch's optimizer uses at each step, JSON
    python3 scripts/torch_reference.py schedule --schedule onecycle --lr 3e-3 --total-steps 2340

    # the fixtures of tests/schedule.rs and tests/augment.rs
    python3 scripts/torch_reference.py fixtures tests/fixtures

    # the fixtures of tests/torch_parity.rs: per-step losses and lrs of lenet's --no-shuffle runs
    # from tests/fixtures/parity_init.safetensors, for each optimizer and schedule
    python3 scripts/torch_reference.py parity-fixtures tests/fixtures
    # only some cases recorded again (new ones appended), the others kept as they are
    python3 scripts/torch_reference.py parity-fixtures tests/fixtures --only rmsprop-plain

`recipe` shuffles with torch.randperm, not with lenet's generator, so it reproduces accuracy
figures, not lenet's batches; `train` takes lenet's --no-shuffle batches and is the bit-level twin.
The shift augmentation draws exactly what src/augment.rs draws (same seed, epoch, position), in
both modes.

Needs torch, safetensors and numpy (pip install torch safetensors numpy). Not used by the tests
(they read the fixtures this script wrote).
"""

import argparse
import gzip
import json
import os
import re
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "mnist")
SIDE = 28
# Where the model and the data live: --device (cpu, or cuda on a GPU machine).
DEVICE = torch.device("cpu")


def sync():
    """Waits for the device, so that a timer read after it has measured the work."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# The layer table: src/network.rs's LENET5, read from the source (the one statement of the
# topology), as (name, kind, fields) rows in order. kind is "ConvReluPool" or "Linear".
NETWORK_RS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "network.rs")
LAYER_ROW = re.compile(r'name:\s*"(\w+)",\s*kind:\s*LayerKind::(ConvReluPool|Linear)\s*\{([^}]*)\}')


def layer_table(path=NETWORK_RS):
    with open(path) as f:
        text = f.read()
    start = text.index("pub const LENET5")
    rows = []
    for name, kind, fields in LAYER_ROW.findall(text[start:text.index("];", start)]):
        values = dict(field.split(":") for field in fields.replace(" ", "").replace("\n", "").split(",") if field)
        rows.append((name, kind, {k: v == "true" if v in ("true", "false") else int(v) for k, v in values.items()}))
    if not rows:
        raise SystemExit(f"error: no layer rows in {path}'s LENET5")
    return rows


class LeNet5(nn.Module):
    """The network of src/network.rs's layer table: the same state_dict names, the layers built in
    the table's order (so torch.manual_seed(s) initialises them as a hand-written module listing
    them in that order would), conv layers as relu then 2x2 max-pool, linear ones flattening their
    input (PyTorch's c*H*W + h*W + w order) with a ReLU where the row says so."""

    def __init__(self):
        super().__init__()
        self.table = layer_table()
        for name, kind, f in self.table:
            if kind == "ConvReluPool":
                layer = nn.Conv2d(f["in_channels"], f["out_channels"], f["kernel"], padding=f["padding"])
            else:
                layer = nn.Linear(f["in_features"], f["out_features"])
            self.add_module(name, layer)

    def forward(self, x):
        for name, kind, f in self.table:
            layer = getattr(self, name)
            if kind == "ConvReluPool":
                x = F.max_pool2d(F.relu(layer(x)), 2)
            else:
                x = layer(x.flatten(1))
                if f["relu"]:
                    x = F.relu(x)
        return x


def idx(name):
    with gzip.open(os.path.join(DATA, name + ".gz")) as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 0x803:
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, 1, SIDE, SIDE)
    return np.frombuffer(data, np.uint8, offset=8)


def mnist(split):
    prefix = "train" if split == "train" else "t10k"
    images = torch.from_numpy(idx(f"{prefix}-images.idx3-ubyte").astype(np.float32) / 255.0)
    labels = torch.from_numpy(idx(f"{prefix}-labels.idx1-ubyte").astype(np.int64))
    return images.to(DEVICE), labels.to(DEVICE)


def train_val_split(val, train_images=None):
    """lenet's --val N: the last N training images are held out for validation. train_images
    keeps only the first that many images of the training file (as a --data directory holding
    them would)."""
    images, labels = mnist("train")
    if train_images is not None:
        images, labels = images[:train_images], labels[:train_images]
    if val is None:
        return images, labels, None
    if not 0 < val < len(labels):
        raise SystemExit(f"error: --val {val} must be between 1 and {len(labels) - 1}")
    cut = len(labels) - val
    return images[:cut], labels[:cut], (images[cut:], labels[cut:])


def model_from(path):
    model = LeNet5()
    tensors = load_file(path)
    # Optimiser state (adam.*, sgd.*) shares the file; the model takes only its own names.
    names = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in tensors.items() if k in names})
    return model.to(DEVICE)


# --- the shift augmentation: the same draw as src/augment.rs, in 32-bit integer arithmetic ---

MASK32 = 0xFFFF_FFFF
AUGMENT_DOMAIN = 0x5348_4946  # b"SHIF"
WEYL32 = 0x9E37_79B9  # 2^32 / golden ratio, odd


def mix32(x):
    """A 32-bit bijective finaliser (xorshift-multiply, as src/augment.rs's mix32)."""
    x ^= x >> 16
    x = (x * 0x21F0_AAAD) & MASK32
    x ^= x >> 15
    x = (x * 0x735A_2D97) & MASK32
    x ^= x >> 15
    return x


def epoch_key(seed, epoch):
    h = mix32(AUGMENT_DOMAIN ^ (seed & MASK32))
    h = mix32(h ^ (seed >> 32))
    h = mix32(h ^ (epoch & MASK32))
    return mix32(h ^ (epoch >> 32))


def shift_from_key(key, position, max_shift):
    """(dx, dy), each uniform in [-max_shift, max_shift]: words of a Weyl sequence through mix32,
    a word at or above the largest multiple of n = 2P+1 below 2^32 rejected so none is favoured."""
    if max_shift == 0:
        return 0, 0
    n = 2 * max_shift + 1
    limit = (1 << 32) - (1 << 32) % n
    state = mix32(key ^ position)
    shifts = []
    while len(shifts) < 2:
        state = (state + WEYL32) & MASK32
        word = mix32(state)
        if word < limit:
            shifts.append(word % n - max_shift)
    return shifts[0], shifts[1]


def shift_for(seed, epoch, position, max_shift):
    return shift_from_key(epoch_key(seed, epoch), position, max_shift)


def shift_batch(x, seed, epoch, first_position, max_shift):
    """x: [B, 1, 28, 28]. Image j (at position first_position + j of the epoch's order) moved by
    (dx, dy) whole pixels, zero-filled: out[y][x] = in[y - dy][x - dx], so +dx moves it right."""
    if max_shift == 0:
        return x
    key = epoch_key(seed, epoch)
    return shift_batch_by(x, [shift_from_key(key, first_position + j, max_shift) for j in range(x.shape[0])])


def shift_batch_by(x, offsets):
    out = torch.zeros_like(x)
    for j, (dx, dy) in enumerate(offsets):
        out[j, :, max(0, dy):SIDE + min(0, dy), max(0, dx):SIDE + min(0, dx)] = \
            x[j, :, max(0, -dy):SIDE - max(0, dy), max(0, -dx):SIDE - max(0, dx)]
    return out


# --- optimizer and schedule, as lenet train's options name them ---

# What each optimizer reads of lenet train's options, and its default weight decay.
OPTIMIZER_OPTIONS = {
    "adam": ([], 0.0),
    "sgd": (["momentum", "nesterov", "weight_decay"], 0.0),
    "adamw": (["weight_decay"], 1e-2),
    "rmsprop": (["alpha", "momentum", "weight_decay", "centered"], 0.0),
}


def make_optimizer(params, args):
    weight_decay = args.weight_decay if args.weight_decay is not None else OPTIMIZER_OPTIONS[args.optimizer][1]
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=weight_decay)
    if args.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=args.lr, alpha=args.alpha, weight_decay=weight_decay,
                                   momentum=args.momentum, centered=args.centered)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                           weight_decay=weight_decay)


def make_schedule(opt, schedule, lr, total_steps):
    """None for constant; stepped after every optimizer step, so total_steps is the run's steps."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    return None


def check_options(args):
    given = {"momentum": args.momentum != 0, "nesterov": args.nesterov, "weight_decay": args.weight_decay is not None,
             "alpha": args.alpha != 0.99, "centered": args.centered}
    for option, is_given in given.items():
        if is_given and option not in OPTIMIZER_OPTIONS[args.optimizer][0]:
            raise SystemExit(f"error: --{option.replace('_', '-')} is not a setting of --optimizer {args.optimizer}")
    if args.nesterov and args.momentum <= 0:
        raise SystemExit("error: --nesterov needs --momentum above 0 (torch.optim.SGD's rule)")
    if args.augment_shift < 0 or args.augment_shift >= SIDE:
        raise SystemExit(f"error: --augment-shift {args.augment_shift} must be in 0..{SIDE - 1}")


def evaluate_on(model, images, labels):
    with torch.no_grad():
        logits = model(images)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


def parity_run(args):
    """lenet's --no-shuffle run from --init: batch i of an epoch is samples i*B .. (i+1)*B of the
    training images (after --val holds out the last ones), shifted by lenet's draw. Returns the
    model, each step's (loss, lr) and each epoch end's validation (step, loss, accuracy)."""
    check_options(args)
    model = model_from(args.init)
    opt = make_optimizer(model.parameters(), args)
    sched = make_schedule(opt, args.lr_schedule, args.lr, args.steps)
    images, labels, val = train_val_split(args.val, args.train_images)
    b = args.batch
    steps_per_epoch = len(labels) // b
    steps, validations = [], []
    for step in range(args.steps):
        epoch, i = divmod(step, steps_per_epoch)
        x = shift_batch(images[i * b:(i + 1) * b], args.seed, epoch, i * b, args.augment_shift)
        loss = F.cross_entropy(model(x), labels[i * b:(i + 1) * b])
        opt.zero_grad()
        loss.backward()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        if sched is not None:
            sched.step()
        steps.append((loss.item(), lr))
        # lenet evaluates after each epoch and after the run's last step.
        if val is not None and (i == steps_per_epoch - 1 or step + 1 == args.steps):
            validations.append((step + 1, *evaluate_on(model, *val)))
    return model, steps, validations


def train(args):
    model, steps, validations = parity_run(args)
    for n, (loss, lr) in enumerate(steps, 1):
        # The lr is printed only where a schedule moves it, so the default lines stay as they were.
        print(f"step {n} loss {loss:.6f}" + (f" lr {lr!r}" if args.lr_schedule != "constant" else ""))
        for step, val_loss, val_accuracy in validations:
            if step == n:
                print(f"after step {n}: validation loss {val_loss:.6f} accuracy {100 * val_accuracy:.2f}%")
    if args.val is not None:
        test_loss, test_accuracy = evaluate_on(model, *mnist("test"))
        print(f"test loss {test_loss:.4f} accuracy {100 * test_accuracy:.2f}%")
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, args.save)


def evaluate(args):
    model = model_from(args.weights)
    images, labels = mnist("test")
    with torch.no_grad():
        logits = model(images)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    print(f"accuracy {100 * accuracy:.2f}% ({int(round(accuracy * len(labels)))}/{len(labels)}), loss {loss:.4f}")


def recipe(args):
    """Shuffled epochs (torch.randperm), evaluated after each: on the test set, or with --val on
    the held-out images and on the test set once at the end. Seconds are training time, the
    evaluations left out (as lenet's train_seconds). --until stops at the first evaluation that
    reaches it, as lenet's does."""
    check_options(args)
    torch.manual_seed(args.seed)
    model = LeNet5().to(DEVICE)
    opt = make_optimizer(model.parameters(), args)
    images, labels, val = train_val_split(args.val)
    test = mnist("test")
    b = args.batch
    steps_per_epoch = len(labels) // b
    sched = make_schedule(opt, args.lr_schedule, args.lr, args.epochs * steps_per_epoch)
    until = None if args.until is None else (args.until / 100 if args.until > 1 else args.until)
    seconds = 0.0
    for epoch in range(args.epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(labels))
        for i in range(steps_per_epoch):
            idx = perm[i * b:(i + 1) * b]
            x = shift_batch(images[idx], args.seed, epoch, i * b, args.augment_shift)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        sync()
        seconds += time.perf_counter() - start
        if val is None:
            _, accuracy = evaluate_on(model, *test)
            print(f"epoch {epoch + 1}: test accuracy {100 * accuracy:.2f}% ({seconds:.1f} s)", flush=True)
        else:
            val_loss, accuracy = evaluate_on(model, *val)
            print(f"epoch {epoch + 1}: validation loss {val_loss:.4f} accuracy {100 * accuracy:.2f}% "
                  f"({seconds:.1f} s)", flush=True)
        if until is not None and accuracy >= until:
            print(f"reached {100 * until:.2f}% after epoch {epoch + 1}, {seconds:.1f} s of training")
            break
    if val is not None:
        test_loss, test_accuracy = evaluate_on(model, *test)
        print(f"test loss {test_loss:.4f} accuracy {100 * test_accuracy:.2f}%")


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
    model = LeNet5().to(DEVICE)
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
        sync()
        times.append(time.perf_counter() - t0)
    median = sorted(times[5:])[len(times[5:]) // 2]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}: "
          f"{1e3 * median:.2f} ms/step, {b / median:.0f} images/s (median of {len(times) - 5} steps)")


# --- per-step hyper-parameters and the fixtures the Rust tests compare against ---

def f64_bits(x):
    return format(struct.unpack("<Q", struct.pack("<d", x))[0], "016x")


def schedule_trace(schedule, lr, total_steps, optimizer):
    """The lr and the cycled momentum (Adam's beta1 or SGD's momentum) that torch's optimizer reads
    at each of total_steps steps, recorded by a hook that runs inside optimizer.step()."""
    weight = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([weight], lr=lr) if optimizer == "adam" else torch.optim.SGD([weight], lr=lr)
    sched = make_schedule(opt, schedule, lr, total_steps)
    lrs, momenta = [], []

    def record(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        lrs.append(group["lr"])
        momenta.append(group["betas"][0] if "betas" in group else group["momentum"])

    opt.register_step_pre_hook(record)
    for _ in range(total_steps):
        weight.grad = torch.ones(1)
        opt.step()
        if sched is not None:
            sched.step()
    cycles = schedule == "onecycle"
    for value in lrs + (momenta if cycles else []):
        assert isinstance(value, float), "a tensor lr or momentum would not be the Python float traced"
    return {
        "schedule": schedule, "lr": lr, "lr_bits_of_peak": f64_bits(lr), "total_steps": total_steps,
        "optimizer": optimizer,
        "torch": torch.__version__,
        "lr_per_step": lrs, "momentum_per_step": momenta if cycles else None,
        # The bits are what the tests compare: a decimal string read back by another parser
        # may land one ulp away.
        "lr_bits": [f64_bits(x) for x in lrs],
        "momentum_bits": [f64_bits(x) for x in momenta] if cycles else None,
    }


def schedule(args):
    print(json.dumps(schedule_trace(args.schedule, args.lr, args.total_steps, args.optimizer)))


def mix32_inverse(x):
    inv15 = lambda v: v ^ (v >> 15) ^ (v >> 30)
    x = inv15(x)
    x = (x * pow(0x735A_2D97, -1, 1 << 32)) & MASK32
    x = inv15(x)
    x = (x * pow(0x21F0_AAAD, -1, 1 << 32)) & MASK32
    return x ^ (x >> 16)


def rejected_word_position(key, which):
    """A position whose word number `which` (0: dx's first, 1: the next) is rejected, which no random
    case hits (probability about n/2^32): mix32 is a bijection, so run the draw backwards from
    the largest word, which every odd n > 1 rejects."""
    assert all(mix32_inverse(mix32(v)) == v for v in (0, 1, 0xDEADBEEF, MASK32))
    state = (mix32_inverse(MASK32) - (which + 1) * WEYL32) & MASK32
    return mix32_inverse(state) ^ key


SCHEDULE_FIXTURES = [
    # (schedule, lr, total_steps, optimizer): the odd, the tiny and a full ten-epoch run.
    ("constant", 1e-3, 5, "adam"),
    *[("cosine", 3e-3, steps, "adam") for steps in (2340, 1, 2)],
    ("cosine", 1e-3, 7, "adam"),
    ("cosine", 0.1, 469, "sgd"),
    ("onecycle", 3e-3, 2340, "adam"),
    *[("onecycle", 4e-3, steps, "adam") for steps in (1, 2, 3, 7, 10)],
    ("onecycle", 0.05, 469, "sgd"),
]


def fixtures(args):
    os.makedirs(args.dir, exist_ok=True)
    traces = [schedule_trace(*case) for case in SCHEDULE_FIXTURES]
    for trace in traces:
        del trace["lr_per_step"], trace["momentum_per_step"]  # the bits say it exactly, in half the bytes
    with open(os.path.join(args.dir, "schedules.json"), "w") as f:
        f.write('{"generated_by": "scripts/torch_reference.py fixtures", "cases": [\n')
        f.write(",\n".join(json.dumps(trace) for trace in traces))
        f.write("\n]}\n")

    cases = []
    for seed in (0, 1, 42, 2**32 - 1, 2**32, 0xDEAD_BEEF_CAFE_F00D, 2**64 - 1):
        for epoch in (0, 1, 9, 2**32 + 3):
            for max_shift in (1, 2, 3, 27):
                for position in (0, 1, 255, 59_999):
                    cases.append((seed, epoch, position, max_shift))
    for max_shift in (1, 2, 27):  # the rejection branch, for dx's word and dy's, for two keys
        for seed, epoch in ((0, 0), (7, 3)):
            for which in (0, 1):
                position = rejected_word_position(epoch_key(seed, epoch), which)
                cases.append((seed, epoch, position, max_shift))
    # u64 seeds and epochs as strings: not every JSON reader keeps integers above 2^53.
    draws = [json.dumps({"seed": str(s), "epoch": str(e), "position": p, "max_shift": m,
                         "epoch_key": epoch_key(s, e), "dx": dx, "dy": dy})
             for (s, e, p, m) in cases for (dx, dy) in [shift_for(s, e, p, m)]]
    # One image through shift_batch at a few offsets, so that the Rust test sees the same
    # convention (+dx right, +dy down), not only the same draws.
    source = [(7 * i + 3 * (i // SIDE)) % 251 + 1 for i in range(SIDE * SIDE)]
    offsets = [(0, 0), (1, 0), (0, 1), (-2, 1), (3, -2), (-27, 27), (27, -1)]
    batch = torch.tensor(source, dtype=torch.float32).reshape(1, 1, SIDE, SIDE).repeat(len(offsets), 1, 1, 1)
    images = []
    for j, (dx, dy) in enumerate(offsets):
        out = shift_batch_by(batch[j:j + 1], [(dx, dy)])
        images.append(json.dumps({"dx": dx, "dy": dy, "pixels": [int(v) for v in out.flatten().tolist()]}))
    with open(os.path.join(args.dir, "augment_shifts.json"), "w") as f:
        f.write('{"generated_by": "scripts/torch_reference.py fixtures",\n"source": ')
        f.write(json.dumps(source))
        f.write(',\n"shifted": [\n' + ",\n".join(images) + "\n],")
        f.write('\n"draws": [\n' + ",\n".join(draws) + "\n]}\n")
    print(f"wrote {len(traces)} schedules and {len(draws)} shift draws to {args.dir}")


# The --no-shuffle runs tests/torch_parity.rs repeats with lenet, on both paths: each optimizer
# and schedule, the shift augmentation and a validation split, at batch 32 on the first 2,000
# training images (so that lavapipe runs them in seconds). (name, steps, lenet train's options).
PARITY_TRAIN_IMAGES = 2000
PARITY_BATCH = 32
PARITY_CASES = [
    ("adam-constant", 30, []),
    ("adam-cosine", 30, ["--lr", "3e-3", "--lr-schedule", "cosine"]),
    ("adam-onecycle-shift2", 30, ["--lr", "4e-3", "--lr-schedule", "onecycle", "--augment-shift", "2"]),
    ("sgd-plain", 30, ["--optimizer", "sgd", "--lr", "0.1"]),
    ("sgd-nesterov-onecycle", 30, ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--nesterov",
                                   "--weight-decay", "5e-4", "--lr-schedule", "onecycle"]),
    # 1,000 images held out: 31 steps an epoch, so the run crosses into a second epoch (new shifts)
    # after an evaluation on the held-out images.
    ("sgd-momentum-cosine-val-shift1", 40, ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
                                            "--lr-schedule", "cosine", "--augment-shift", "1", "--val", "1000"]),
    ("adamw-onecycle", 30, ["--optimizer", "adamw", "--lr", "3e-3", "--lr-schedule", "onecycle"]),
    ("adamw-decay-cosine-shift1", 30, ["--optimizer", "adamw", "--lr", "2e-3", "--weight-decay", "0.1",
                                       "--lr-schedule", "cosine", "--augment-shift", "1"]),
    ("rmsprop-plain", 30, ["--optimizer", "rmsprop", "--lr", "1e-4"]),
    ("rmsprop-centered-momentum-decay", 30, ["--optimizer", "rmsprop", "--lr", "1e-4", "--alpha", "0.9",
                                             "--momentum", "0.9", "--weight-decay", "1e-3", "--centered"]),
    # OneCycleLR cycles RMSprop's momentum, from 0 too (PyTorch sets it to 0.95 on the first step).
    ("rmsprop-onecycle", 30, ["--optimizer", "rmsprop", "--lr", "3e-4", "--lr-schedule", "onecycle"]),
]


def parity_fixtures(args):
    """tests/fixtures/parity_init.safetensors (PyTorch's default initialisation, seed 0) and
    tests/fixtures/parity.json: each case's per-step losses and learning rates and its validations."""
    os.makedirs(args.dir, exist_ok=True)
    init = os.path.join(args.dir, "parity_init.safetensors")
    torch.manual_seed(0)
    if not os.path.exists(init) or not args.only:
        save_file({k: v.contiguous() for k, v in LeNet5().state_dict().items()}, init)
    parser = argparse.ArgumentParser()
    add_training_options(parser, 1e-3)
    path = os.path.join(args.dir, "parity.json")
    # --only: those cases recorded again, the others kept as the file has them (another machine's
    # oneDNN may round the old runs' last bits differently).
    kept = {}
    if args.only:
        with open(path) as f:
            kept = {c["name"]: json.dumps(c) for c in json.load(f)["cases"]}
    cases = []
    for name, steps, options in PARITY_CASES:
        if args.only and name not in args.only:
            cases.append(kept[name])
            continue
        run = parser.parse_args(options)
        run.init, run.steps, run.batch, run.train_images = init, steps, PARITY_BATCH, PARITY_TRAIN_IMAGES
        _, per_step, validations = parity_run(run)
        cases.append(json.dumps({
            "name": name, "options": options, "steps": steps,
            # loss.item() of a float32 loss: exact as a Python float.
            "losses": [loss for loss, _ in per_step],
            # As bit patterns: a decimal read back by another parser may land one ulp away.
            "lr_bits": [f64_bits(lr) for _, lr in per_step],
            "validations": [{"step": s, "loss": l, "accuracy": a} for s, l, a in validations],
        }))
    with open(path, "w") as f:
        f.write(json.dumps({"generated_by": "scripts/torch_reference.py parity-fixtures", "torch": torch.__version__,
                            "train_images": PARITY_TRAIN_IMAGES, "batch": PARITY_BATCH, "seed": 0})[:-1])
        f.write(', "cases": [\n' + ",\n".join(cases) + "\n]}\n")
    print(f"wrote {init} and {len(cases)} parity cases to {args.dir}/parity.json")


def add_training_options(p, default_lr):
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=default_lr, help="the peak of a schedule")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_OPTIONS), default="adam")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD's and RMSprop's")
    p.add_argument("--nesterov", action="store_true", help="SGD's")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="SGD's and RMSprop's L2 term, AdamW's decoupled decay (default 0; AdamW 1e-2)")
    p.add_argument("--alpha", type=float, default=0.99, help="RMSprop's smoothing constant")
    p.add_argument("--centered", action="store_true", help="RMSprop's")
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "onecycle"], default="constant")
    p.add_argument("--augment-shift", type=int, default=0, metavar="P",
                   help="shift each training image by up to P whole pixels on each axis")
    p.add_argument("--seed", type=int, default=0, help="seeds the shift draw (and, in recipe, init and shuffling)")
    p.add_argument("--val", type=int, default=None, metavar="N",
                   help="hold out the last N training images; evaluate on them at epoch ends")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="where PyTorch runs: cpu, or cuda (train, eval, recipe, speed)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="lenet's --no-shuffle steps from --init, for parity")
    t.add_argument("--init", required=True)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--save", required=True)
    t.add_argument("--train-images", type=int, default=None, metavar="T",
                   help="train on the first T images of the training file only (then --val holds out its last N)")
    add_training_options(t, 1e-3)
    e = sub.add_parser("eval")
    e.add_argument("--weights", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    r = sub.add_parser("recipe", help="the default recipe with shuffling, test accuracy per epoch")
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--until", type=float, default=None, metavar="ACC",
                   help="stop at the first evaluation reaching ACC (99 or 0.99)")
    add_training_options(r, 1e-3)
    s = sub.add_parser("speed")
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--steps", type=int, default=60)
    h = sub.add_parser("schedule", help="per-step lr and momentum/beta1 torch's optimizer uses, as JSON")
    h.add_argument("--schedule", choices=["constant", "cosine", "onecycle"], required=True)
    h.add_argument("--lr", type=float, required=True)
    h.add_argument("--total-steps", type=int, required=True)
    h.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    x = sub.add_parser("fixtures", help="write tests/fixtures/{schedules,augment_shifts}.json")
    x.add_argument("dir")
    q = sub.add_parser("parity-fixtures", help="write tests/fixtures/parity.json and its initial weights")
    q.add_argument("dir")
    q.add_argument("--only", nargs="+", metavar="CASE", help="record these cases again, keep the others")
    args = p.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        # Full float32 as lenet computes, not TF32's 10-bit mantissas (cuDNN's convolutions use
        # TF32 by default on Ampere and later; PyTorch's figures in ../shared/gpu are TF32-off).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    {"train": train, "eval": evaluate, "compare": compare, "recipe": recipe, "speed": speed,
     "schedule": schedule, "fixtures": fixtures, "parity-fixtures": parity_fixtures}[args.cmd](args)


if __name__ == "__main__":
    main()
