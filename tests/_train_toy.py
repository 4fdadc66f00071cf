"""Train the toy blob-counting problem with checkpoints; run by tests/test_training.py as a subprocess
(plain, killed and resumed, or under `torchrun --nproc-per-node 2`). Not a test module itself."""
import argparse, json, os, time
from pathlib import Path
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from deeplense_nb.core import atomic_write_text, seed_everything
from deeplense_nb.training import (Callback, HistoryLogger, Learner, SaveCheckpoint, accuracy, roc_auc,
                                   synthetic_classification, tiny_cnn)
from deeplense_nb.callbacks import EMA, OneCycle


class RandomFlip(Dataset):
    "Random horizontal flips drawn from torch's global RNG (so resuming must restore it)."
    def __init__(self, ds): self.ds = ds
    def __len__(self): return len(self.ds)
    def __getitem__(self, i):
        x, y = self.ds[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


class Marker(Callback):
    "Write the current epoch to a file at the start of each epoch; optionally sleep after each batch."
    def __init__(self, path, slow): self.path, self.slow = path, slow
    def before_epoch(self):
        if self.path and self.learn.is_main: atomic_write_text(self.path, str(self.learn.epoch))
    def after_batch(self):
        if self.slow and self.learn.training: time.sleep(self.slow)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--bs", type=int, default=32, help="global batch size")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--marker", default=None)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--norm", action="store_true")
    p.add_argument("--ema", type=float, default=None)
    a = p.parse_args()
    torch.use_deterministic_algorithms(True)
    seed_everything(0)
    tr, va = synthetic_classification(256, seed=0), synthetic_classification(128, seed=1)
    tdl = DataLoader(RandomFlip(tr) if a.augment else tr, batch_size=a.bs, shuffle=True, generator=torch.Generator().manual_seed(0))
    vdl = DataLoader(va, batch_size=64)
    cbs = [SaveCheckpoint(monitor="roc_auc"), HistoryLogger(), OneCycle(), Marker(a.marker, a.slow)]
    if a.ema: cbs.append(EMA(a.ema))
    learn = Learner(tiny_cnn(norm=a.norm, dropout=a.dropout), tdl, vdl, loss_func=nn.CrossEntropyLoss(), lr=3e-3,
                    metrics=[roc_auc, accuracy], cbs=cbs, device="cpu", path=a.out, progress=False)
    learn.fit(a.epochs, resume=a.out if a.resume else None)
    if learn.is_main:
        atomic_write_text(Path(a.out) / "final.json", json.dumps({"history": learn.history, "world_size": learn.world_size,
                                                                  "env_world_size": int(os.environ.get("WORLD_SIZE", 1))}))


if __name__ == "__main__":
    main()
