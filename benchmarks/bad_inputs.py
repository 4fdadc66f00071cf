#!/usr/bin/env python
"""Bad-input matrix for the `deeplense` CLI (issue #15).

Runs the CLI over a list of bad inputs (crafted checkpoints, finished run folders, broken data, bad option values)
and classifies what each run did:

  clear              failed with exit 2 (or the case's code), no traceback, a one-line error that names the culprit
                     (or, for warn/any cases, accepted the input and said so)
  traceback          'Traceback' in the output, or the process died from a signal
  misleading         failed without a traceback, but the message lacks what the case needs (file name, setting),
                     the exit code is not the expected one, or the error takes several lines
  silently accepted  exit 0 where the case must fail (or must at least warn)
  data loss          a finished run / dataset / user file was changed or removed
  code execution     a marker file a crafted input tries to create exists, or a victim folder was changed
  timeout            still running after the case's time limit (killed)
  skipped            the case cannot be measured here (e.g. chmod cases as root, a fixture that failed)

Goal: 0 tracebacks, 0 silent acceptance, 0 data loss, 0 code execution.

    python benchmarks/bad_inputs.py                  # all cases, 2 at a time; table + bench_results/bad_inputs.json
    python benchmarks/bad_inputs.py --only 'ckpt_*'  # a subset (shell pattern or substring of the case name)
    python benchmarks/bad_inputs.py --strict         # exit 1 when any traceback/silent/data loss/code execution/timeout
    python benchmarks/bad_inputs.py --mode subprocess --deeplense .venv/bin/deeplense   # one fresh process per case

Modes. `fork` (default when this interpreter can import deeplense_nb): a forkserver imports torch, torchvision and
deeplense_nb once and forks one child per case that calls `deeplense_nb.cli.main(argv)` exactly as the console
script does (stdout/stderr to files, own session, uncaught exceptions printed as Python prints them, exit status
kept). On a 2-core machine importing torch + torchvision takes ~20 s, so this is what makes ~80 cases fit in a few
minutes. `subprocess`: every case runs the real `deeplense` executable (slower; the exact end-user path).

To measure committed code rather than the working tree: `git archive HEAD | tar -x -C /tmp/head` and run with
`PYTHONPATH=/tmp/head` (both modes honour it).

Adding a case is one line in `CASES` (see `Case`).
"""
from __future__ import annotations
import argparse, fnmatch, hashlib, json, os, pickle, re, shlex, shutil, signal, subprocess, sys, tempfile, textwrap, threading, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CATS = ["clear", "traceback", "misleading", "silently accepted", "data loss", "code execution", "timeout", "skipped"]
BAD = ("traceback", "silently accepted", "data loss", "code execution", "timeout")

# ----------------------------------------------------------------------------------------------------------------
# Case description
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One bad input. `argv(ctx, d)` returns ['deeplense', ...] or ['python', '-c', CODE, ...]; it runs with cwd `d`
    (the case's own folder, prepared by `setup(ctx, d)`).
    expect: 'error' (must fail with exit `rc`), 'warn' (must fail cleanly or succeed while mentioning `must`),
            'any' (exit 0 or a clean error are both fine; only tracebacks, hangs, data loss and code execution count).
    must:   every entry must appear (case-insensitive) in the error (for 'warn': anywhere in the output);
            an entry may be a tuple of alternatives.
    markers: files (relative to d) a crafted input tries to create -> code execution when they exist afterwards.
    victims: paths (relative to d) a crafted input tries to change/remove -> code execution when changed.
    keep:    paths (relative to d) that must be unchanged afterwards -> data loss when changed or removed.
    keep_json: ((path, ignored_keys), ...): JSON files whose values (less ignored keys) must be unchanged -> data loss.
    needs:   fixtures the case needs ('ref', 'lf', 'diffusion_ckpt', 'torch_pickle'); skipped when one is missing."""
    name: str
    group: str
    argv: Callable
    setup: Callable | None = None
    expect: str = "error"
    rc: int = 2
    must: tuple = ()
    markers: tuple = ()
    victims: tuple = ()
    keep: tuple = ()
    keep_json: tuple = ()   # (path, keys to ignore): a JSON file whose content must be unchanged -> data loss
    needs: tuple = ()
    timeout: float = 150
    root_skip: str | None = None   # reason to skip when running as root (chmod does not stop root)
    note: str = ""

# ----------------------------------------------------------------------------------------------------------------
# Fixture helpers (numpy + safetensors.numpy only: this process never imports torch)
# ----------------------------------------------------------------------------------------------------------------
class _Evil:
    "Pickles to a call of os.system(cmd): whoever unpickles it runs the command."
    def __init__(self, cmd): self.cmd = cmd
    def __reduce__(self): return (os.system, (self.cmd,))

def touch_cmd(p: Path) -> str: return f"touch {shlex.quote(str(p))}"

def tree_hash(p: Path) -> str:
    "A digest of a file or folder (names, symlink targets and contents); 'MISSING' when it is gone."
    p = Path(p)
    if not os.path.lexists(p): return "MISSING"
    h = hashlib.sha256()
    def add_file(f: Path, rel: str):
        h.update(f"F {rel} {oct(f.stat().st_mode & 0o777)}\n".encode())
        try:
            with open(f, "rb") as fh:
                for b in iter(lambda: fh.read(1 << 20), b""): h.update(b)
        except OSError as e: h.update(f"unreadable {e.errno}".encode())
    if p.is_symlink(): h.update(f"L {os.readlink(p)}".encode()); return h.hexdigest()
    if p.is_file(): add_file(p, "."); return h.hexdigest()
    for dp, dns, fns in os.walk(p, followlinks=False):
        dns.sort()
        rel = os.path.relpath(dp, p)
        h.update(f"D {rel}\n".encode())
        for fn in sorted(fns + [x for x in dns if os.path.islink(os.path.join(dp, x))]):
            f = Path(dp) / fn
            if f.is_symlink(): h.update(f"L {rel}/{fn} {os.readlink(f)}\n".encode())
            elif f.is_file(): add_file(f, f"{rel}/{fn}")
    return h.hexdigest()

def copy_ds(c, d: Path, name="data") -> Path:
    dst = d / name; shutil.copytree(c.ds, dst, symlinks=True); return dst

def variant(mutate: Callable, name="data"):
    "setup(): copy the plain Task I dataset to d/data and apply mutate(root)."
    def setup(c, d):
        mutate(copy_ds(c, d, name))
    return setup

def img(val=None, shape=(1, 150, 150), dtype="float64"):
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.random(shape) if val is None else np.full(shape, val)
    return x.astype(dtype)

def save_npy(path: Path, arr, allow_pickle=False):
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f: np.save(f, arr, allow_pickle=allow_pickle)

def with_pixel(value):
    def m(root):
        x = img(); x[0, 70:80, 70:80] = value; save_npy(root / "train/no/99.npy", x)
    return m

def add_file(rel, content):
    def m(root):
        p = root / rel; p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return m

def add_arr(rel, arr_fn, allow_pickle=False):
    def m(root): save_npy(root / rel, arr_fn(), allow_pickle=allow_pickle)
    return m

def object_array():
    import numpy as np
    a = np.empty(2, dtype=object); a[0] = img(); a[1] = 1; return a

def evil_npy(d: Path):
    import numpy as np
    a = np.empty(1, dtype=object); a[0] = _Evil(touch_cmd(d / "PWNED")); return a

def truncated_npy():
    import io, numpy as np
    b = io.BytesIO(); np.save(b, img()); return b.getvalue()[: 128 + 1000]

def rm(rel):
    def m(root):
        p = root / rel
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return m

def empty_dir(rel):
    def m(root):
        p = root / rel; shutil.rmtree(p); p.mkdir()
    return m

def chain(*fs):
    def m(root):
        for f in fs: f(root)
    return m

def symlink(rel, target):
    def m(root): os.symlink(target, root / rel)
    return m

def chmod(rel, mode):
    def m(root): os.chmod(root / rel, mode)
    return m

def nested_root(c, d):
    (d / "data").mkdir(); shutil.copytree(c.ds, d / "data" / "dataset")

def nested_splits(c, d):
    for s in ("train", "val"):
        shutil.copytree(c.ds / s, d / "data" / s / s)

def only_train(c, d):
    (d / "data").mkdir(); shutil.copytree(c.ds / "train", d / "data" / "train")

def one_class(c, d):
    for s in ("train", "val"): shutil.copytree(c.ds / s / "no", d / "data" / s / "no")

def two_class(root):
    for s in ("train", "val"): shutil.rmtree(root / s / "vort")

def user_folder(c, d, name="mine"):
    p = d / name; p.mkdir(); (p / "thesis.tex").write_text("months of work\n"); (p / "results.csv").write_text("a,b\n1,2\n")

def user_file(c, d, name="notes.txt"):
    (d / name).write_text("do not overwrite me\n")

def run_copy(c, d, name="run"):
    shutil.copytree(c.ref, d / name)

# --- crafted checkpoints --------------------------------------------------------------------------------------
def read_ckpt(path: Path):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    with safe_open(str(path), "np") as f: md = dict(f.metadata() or {})
    return load_file(str(path)), md

def craft(dst: Path, c, *, model_config="__keep__", meta_raw=None, fmt=None, state_raw=None, tensors=None, drop_meta=False):
    "A copy of the reference best.ckpt with its metadata rewritten."
    from safetensors.numpy import save_file
    t, md = read_ckpt(c.ref / "best.ckpt")
    meta = json.loads(md["meta"])
    if model_config != "__keep__": meta["model_config"] = model_config
    if model_config is None: meta.pop("model_config", None)
    md["meta"] = meta_raw if meta_raw is not None else json.dumps(meta)
    if drop_meta: md.pop("meta")
    if fmt is not None: md["format"] = fmt
    if state_raw is not None: md["state"] = state_raw
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else t, str(dst), metadata=md)
    return dst

def ckpt_builder(builder, kwargs_fn):
    "setup(): evil.ckpt whose model_config names `builder` with kwargs_fn(c, d)."
    def setup(c, d):
        craft(d / "evil.ckpt", c, model_config={"builder": builder, "kwargs": kwargs_fn(c, d)})
    return setup

def ref_kwargs(c):
    _, md = read_ckpt(c.ref / "best.ckpt")
    return dict(json.loads(md["meta"])["model_config"].get("kwargs", {}))

def ref_builder(c):
    _, md = read_ckpt(c.ref / "best.ckpt")
    return json.loads(md["meta"])["model_config"]["builder"]

def victim_ds(c, d):
    shutil.copytree(c.sim, d / "victim")

def evil_notebook(c, d):
    nb = {"cells": [
        {"cell_type": "code", "execution_count": None, "id": "p", "metadata": {"tags": ["parameters"]}, "outputs": [],
         "source": "out_dir = ''\n"},
        {"cell_type": "code", "execution_count": None, "id": "x", "metadata": {}, "outputs": [],
         "source": f"open({str(d / 'PWNED')!r}, 'w').write('pwned')\n"}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5}
    (d / "evil.ipynb").write_text(json.dumps(nb))

def with_setups(*fs):
    def setup(c, d):
        for f in fs: f(c, d)
    return setup

# --- argv builders ----------------------------------------------------------------------------------------------
TRAIN_BASE = ["--model", "cnn_baseline", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress"]

def TRAIN(data="data", out="run", *extra):
    "argv(): train on `data` (relative to the case folder, or 'DS' for the shared plain dataset) into `out`."
    return lambda c, d: ["deeplense", "train", "--data", str(c.ds) if data == "DS" else data, "--out", out, *TRAIN_BASE, *extra]

def EVAL(ckpt="evil.ckpt", data="DS", *extra):
    def argv(c, d):
        k = str(c.ref) if ckpt == "REF" else ckpt
        dd = {"DS": str(c.ds), "LF": str(c.lf)}.get(data, data)
        return ["deeplense", "evaluate", "--checkpoint", k, "--data", dd, "--out", "ev", "--device", "cpu", "--n-boot", "0", *extra]
    return argv

def API(body: str, *args):
    "argv(): run `body` through the Python API; DeepLenseError/FileNotFoundError -> one line on stderr, exit 2."
    code = ("import sys\nfrom deeplense_nb.core import DeepLenseError\ntry:\n" + textwrap.indent(textwrap.dedent(body), "    ") +
            "\nexcept (DeepLenseError, FileNotFoundError) as e:\n    print(f'error: {e}', file=sys.stderr); sys.exit(2)\n")
    return lambda c, d: ["python", "-c", code, *args]

def CLI(*args):
    return lambda c, d: ["deeplense", *[str(c.ds) if a == "DS" else a for a in args]]

LOADER_API = """
try: from deeplense_nb.checkpoint import load_model
except ImportError: from deeplense_nb.training import load_model
load_model(sys.argv[1])
"""

# ----------------------------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------------------------
ONE_LEVEL = ("nested", "too deep", "one level", "inside")
CASES: list[Case] = [
    # 1. crafted checkpoints ---------------------------------------------------------------------------------------
    Case("ckpt_builder_os_system", "checkpoint", EVAL(), ckpt_builder("os:system", lambda c, d: {"command": touch_cmd(d / "PWNED")}),
         must=("evil.ckpt",), markers=("PWNED",), needs=("ref",)),
    Case("ckpt_builder_shutil_rmtree", "checkpoint", EVAL(),
         with_setups(user_folder, ckpt_builder("shutil:rmtree", lambda c, d: {"path": str(d / "mine")})),
         must=("evil.ckpt",), victims=("mine",), needs=("ref",)),
    Case("ckpt_builder_simulate_overwrite", "checkpoint", EVAL(),
         with_setups(victim_ds, ckpt_builder("deeplense_nb.simulate:simulate_task1",
                     lambda c, d: {"out": str(d / "victim"), "overwrite": True, "n_train": 3, "n_val": 3, "progress": False})),
         must=("evil.ckpt",), victims=("victim",), needs=("ref",)),
    Case("ckpt_builder_atomic_write_text", "checkpoint", EVAL(),
         ckpt_builder("deeplense_nb.core:atomic_write_text", lambda c, d: {"path": str(d / "PWNED"), "text": "pwned"}),
         must=("evil.ckpt",), markers=("PWNED",), needs=("ref",)),
    Case("ckpt_builder_cli_main", "checkpoint", EVAL(),
         with_setups(victim_ds, ckpt_builder("deeplense_nb.cli:main", lambda c, d: {"argv": [
             "simulate", "task1", "--out", str(d / "victim"), "--overwrite", "--n-train", "3", "--n-val", "3", "--device", "cpu"]})),
         must=("evil.ckpt",), victims=("victim",), needs=("ref",)),
    Case("ckpt_builder_run_notebook", "checkpoint", EVAL(),
         with_setups(evil_notebook, ckpt_builder("deeplense_nb.experiments:run_experiment",
                     lambda c, d: {"name": str(d / "evil.ipynb"), "out": str(d / "nbrun"), "progress": False})),
         must=("evil.ckpt",), markers=("PWNED",), needs=("ref",), timeout=240),
    Case("ckpt_builder_module_attr", "checkpoint", EVAL(),
         ckpt_builder("deeplense_nb.data:shutil", lambda c, d: {}), must=("evil.ckpt",), needs=("ref",),
         note="names a module imported inside a package module"),
    Case("ckpt_unknown_kwargs", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, model_config={"builder": ref_builder(c), "kwargs": {**ref_kwargs(c), "bogus_setting": 1}}),
         must=("evil.ckpt", "bogus_setting"), needs=("ref",)),
    Case("ckpt_kwargs_not_dict", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, model_config={"builder": ref_builder(c), "kwargs": [1, 2]}),
         must=("evil.ckpt",), needs=("ref",)),
    Case("ckpt_model_config_string", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, model_config="cnn_baseline"), must=("evil.ckpt", "model_config"), needs=("ref",)),
    Case("ckpt_model_config_missing", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, model_config=None), must=("evil.ckpt", "model_config"), needs=("ref",)),
    Case("ckpt_meta_not_json", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, meta_raw="{not json"), must=("evil.ckpt",), needs=("ref",)),
    Case("ckpt_meta_missing", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, drop_meta=True), must=("evil.ckpt",), needs=("ref",)),
    Case("ckpt_state_dangling_tensor", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, state_raw=json.dumps({"opt": {"__tensor__": "state.nope"}})),
         must=("evil.ckpt",), needs=("ref",)),
    Case("ckpt_wrong_format_tag", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, fmt="someone.else.v9"), must=("evil.ckpt",), needs=("ref",)),
    Case("ckpt_weights_do_not_fit", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, model_config={"builder": ref_builder(c), "kwargs": {**ref_kwargs(c), "num_classes": 7}}),
         must=("evil.ckpt",), needs=("ref",)),
    Case("ckpt_huge_model", "checkpoint", EVAL(),
         ckpt_builder("deeplense_nb.training:tiny_cnn", lambda c, d: {"in_chans": 1, "num_classes": 3, "width": 10**6}),
         must=("evil.ckpt",), needs=("ref",), note="a checkpoint asking for a 10^13-parameter model"),
    Case("ckpt_pretrained_download", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, model_config={"builder": "deeplense_nb.models:create_model",
                            "kwargs": {"name": "resnet18", "in_chans": 1, "num_classes": 3, "pretrained": True}}),
         must=("evil.ckpt",), needs=("ref",), timeout=120, note="a checkpoint that makes the loader download weights"),
    Case("ckpt_pinn_pretrained_download", "checkpoint", EVAL(),
         lambda c, d: craft(d / "evil.ckpt", c, model_config={"builder": "deeplense_nb.pinn:create_pinn",
                            "kwargs": {"kind": "twohead", "backbone": "resnet18", "in_chans": 1, "num_classes": 3, "pretrained": True}}),
         must=("evil.ckpt",), needs=("ref",), timeout=120),
    Case("ckpt_diffusion_as_classifier", "checkpoint", EVAL("diff.ckpt"),
         lambda c, d: shutil.copy(c.diffusion_ckpt, d / "diff.ckpt"), must=("diff.ckpt",), needs=("diffusion_ckpt",)),
    Case("ckpt_torch_pickle_named_ckpt", "checkpoint", EVAL("model.ckpt"),
         lambda c, d: shutil.copy(c.torch_pickle, d / "model.ckpt"), must=("model.ckpt",), needs=("torch_pickle",)),
    Case("ckpt_torch_pickle_named_pt", "checkpoint", EVAL("model.pt"),
         lambda c, d: shutil.copy(c.torch_pickle, d / "model.pt"), must=("model.pt",), needs=("torch_pickle",)),
    Case("ckpt_evil_pickle", "checkpoint", EVAL("evil.ckpt"),
         lambda c, d: (d / "evil.ckpt").write_bytes(pickle.dumps({"model": _Evil(touch_cmd(d / "PWNED"))}, protocol=2)),
         must=("evil.ckpt",), markers=("PWNED",)),
    Case("ckpt_truncated", "checkpoint", EVAL("best.ckpt"),
         lambda c, d: (d / "best.ckpt").write_bytes((c.ref / "best.ckpt").read_bytes()[:60000]), must=("best.ckpt",), needs=("ref",)),
    Case("ckpt_empty", "checkpoint", EVAL("empty.ckpt"), lambda c, d: (d / "empty.ckpt").write_bytes(b""), must=("empty.ckpt",)),
    Case("ckpt_random_bytes", "checkpoint", EVAL("noise.ckpt"),
         lambda c, d: (d / "noise.ckpt").write_bytes(os.urandom(4096)), must=("noise.ckpt",)),
    Case("ckpt_text_file", "checkpoint", EVAL("notes.ckpt"),
         lambda c, d: (d / "notes.ckpt").write_text('{"model": "resnet18"}\n'), must=("notes.ckpt",)),
    Case("ckpt_plain_safetensors", "checkpoint", EVAL("plain.ckpt"),
         lambda c, d: __import__("safetensors.numpy", fromlist=["x"]).save_file({"w": img(shape=(3, 3), dtype="float32")}, str(d / "plain.ckpt")),
         must=("plain.ckpt",)),
    Case("ckpt_is_directory", "checkpoint", EVAL("model.ckpt"), lambda c, d: (d / "model.ckpt").mkdir(), must=("model.ckpt",)),
    Case("ckpt_missing", "checkpoint", EVAL("nowhere.ckpt"), must=("nowhere.ckpt",)),
    Case("ckpt_empty_run_folder", "checkpoint", EVAL("emptyrun"), lambda c, d: (d / "emptyrun").mkdir(), must=("emptyrun",)),
    Case("ckpt_unreadable", "checkpoint", EVAL("locked.ckpt"),
         lambda c, d: (shutil.copy(c.ref / "best.ckpt", d / "locked.ckpt"), os.chmod(d / "locked.ckpt", 0)),
         must=("locked.ckpt",), needs=("ref",), root_skip="running as root: chmod 000 does not stop reads"),
    Case("ckpt_classes_do_not_match_data", "checkpoint", EVAL("REF", "LF"), must=(("class", "task"),), needs=("ref", "lf")),
    Case("api_load_model_builder_cli_main", "checkpoint", API(LOADER_API, "evil.ckpt"),
         with_setups(victim_ds, ckpt_builder("deeplense_nb.cli:main", lambda c, d: {"argv": [
             "simulate", "task1", "--out", str(d / "victim"), "--overwrite", "--n-train", "3", "--n-val", "3", "--device", "cpu"]})),
         must=("evil.ckpt",), victims=("victim",), needs=("ref",), note="the Python loader used by diffusion/pinn"),
    Case("api_fid_extractor_builder_write", "checkpoint",
         API("from deeplense_nb.diffusion import LensFeatureExtractor\nLensFeatureExtractor(sys.argv[1])", "evil.ckpt"),
         ckpt_builder("deeplense_nb.core:atomic_write_text", lambda c, d: {"path": str(d / "PWNED"), "text": "pwned"}),
         must=("evil.ckpt",), markers=("PWNED",), needs=("ref",), note="diffusion FID feature extractor loading a classifier checkpoint"),
    Case("api_physics_objective_nested_pretrained", "checkpoint", API(LOADER_API, "evil.ckpt"),
         lambda c, d: craft(d / "evil.ckpt", c, model_config={"builder": "deeplense_nb.pinn:create_physics_objective",
                            "kwargs": {"model": {"kind": "twohead", "backbone": "resnet18", "pretrained": True}}}),
         must=("evil.ckpt",), needs=("ref",), timeout=120),

    # 2. re-training into a finished run ------------------------------------------------------------------------------
    Case("retrain_finished_run", "run folder", TRAIN("DS", "run"), run_copy, must=(("--resume", "--overwrite", "resume"), "run"),
         keep=("run",), needs=("ref",)),
    Case("resume_other_model", "run folder", TRAIN("DS", "run", "--resume", "--model", "resnet20"), run_copy,
         must=(("model", "resnet20"),), keep=("run",), needs=("ref",)),
    Case("resume_other_classes", "run folder", TRAIN("data", "run", "--resume"), with_setups(run_copy, variant(two_class)),
         must=(("class", "vort"),), keep=("run",), needs=("ref",)),
    Case("resume_other_task", "run folder", TRAIN("LF", "run", "--resume"),
         with_setups(run_copy, lambda c, d: shutil.copytree(c.lf, d / "LF")),
         must=(("task", "class", "data"),), keep=("run",), needs=("ref", "lf")),
    Case("resume_finished_same_settings", "run folder", TRAIN("DS", "run", "--resume"), run_copy, expect="any",
         keep=("run/best.ckpt",), keep_json=(("run/metrics.json", ("files",)), ("run/config.json", ("data",))), needs=("ref",), note="nothing left to do: must not rewrite the results"),
    Case("resume_truncated_last_ckpt", "run folder", TRAIN("DS", "run", "--resume", "--epochs", "2"),
         lambda c, d: (run_copy(c, d), (d / "run/last.ckpt").write_bytes((c.ref / "last.ckpt").read_bytes()[:50000])),
         must=("last.ckpt",), keep=("run/best.ckpt", "run/metrics.json"), needs=("ref",)),
    Case("train_out_is_file", "run folder", TRAIN("DS", "notes.txt"), user_file, must=("notes.txt",), keep=("notes.txt",)),
    Case("train_out_user_folder", "run folder", TRAIN("DS", "mine"), user_folder, expect="any", keep=("mine/thesis.tex", "mine/results.csv")),
    Case("train_out_inside_data", "run folder", lambda c, d: ["deeplense", "train", "--data", str(c.ds), "--out", str(c.ds / "runs" / "a"), *TRAIN_BASE],
         must=("inside the training data",), note="checkpoints written into the dataset folder would mix with its images"),

    # 3. divergence --------------------------------------------------------------------------------------------------
    Case("train_diverges_lr_1e6", "training", TRAIN("DS", "run", "--lr", "1e6", "--opt", "sgd", "--epochs", "2"),
         must=(("lr", "learning rate", "clip"),), note="expect: exit 2, names --lr / --clip"),

    # 4. bad data (train) ------------------------------------------------------------------------------------------------
    Case("data_nan_pixel", "data", TRAIN(), variant(with_pixel(float("nan"))), must=("99.npy",)),
    Case("data_inf_pixel", "data", TRAIN(), variant(with_pixel(float("inf"))), must=("99.npy",)),
    Case("data_constant_image", "data", TRAIN(), variant(add_arr("train/no/99.npy", lambda: img(0.0))), expect="warn", must=("99.npy",)),
    Case("data_0_255_floats", "data", TRAIN(), variant(add_arr("train/no/99.npy", lambda: (img() * 255).round())),
         expect="warn", must=("99.npy",)),
    Case("data_uint8_image", "data", TRAIN(), variant(add_arr("train/no/99.npy", lambda: (img() * 255).astype("uint8"))),
         expect="warn", must=("99.npy",)),
    Case("data_wrong_size", "data", TRAIN(), variant(add_arr("train/no/99.npy", lambda: img(shape=(1, 64, 64)))), must=("99.npy",)),
    Case("data_wrong_channels", "data", TRAIN(), variant(add_arr("train/no/99.npy", lambda: img(shape=(3, 150, 150)))), must=("99.npy",)),
    Case("data_object_array", "data", TRAIN(), variant(add_arr("train/no/99.npy", object_array, allow_pickle=True)), must=("99.npy",)),
    Case("data_evil_pickle_npy", "data", TRAIN(),
         lambda c, d: variant(lambda root: save_npy(root / "train/no/99.npy", evil_npy(d), allow_pickle=True))(c, d),
         must=("99.npy",), markers=("PWNED",)),
    Case("data_zero_byte_npy", "data", TRAIN(), variant(add_file("train/no/99.npy", b"")), must=("99.npy",)),
    Case("data_text_named_npy", "data", TRAIN(), variant(add_file("train/no/99.npy", "0.1,0.2,0.3\n")), must=("99.npy",)),
    Case("data_truncated_npy", "data", TRAIN(), variant(lambda root: (root / "train/no/99.npy").write_bytes(truncated_npy())), must=("99.npy",)),
    Case("data_empty_class_folder", "data", TRAIN(), variant(empty_dir("train/vort")), must=("vort",)),
    Case("data_unknown_class_folder", "data", TRAIN(),
         variant(chain(add_arr("train/extra/1.npy", img), add_arr("train/extra/2.npy", img))), must=("extra",)),
    Case("data_val_missing_class", "data", TRAIN(), variant(rm("val/vort")), must=("vort",)),
    Case("data_one_class", "data", TRAIN(), one_class, must=("class",)),
    Case("data_non_npy_files", "data", TRAIN(),
         variant(chain(add_file("train/no/photo.png", b"\x89PNG\r\n\x1a\n"), add_file("train/sphere/99.npz", b"PK"))),
         expect="warn", must=(("photo.png", "99.npz", "non-npy", "not .npy", "ignored", "skipp"),)),
    Case("data_symlink_loop_file", "data", TRAIN(), variant(symlink("train/no/99.npy", "99.npy")), must=("99.npy",)),
    Case("data_dangling_symlink", "data", TRAIN(), variant(symlink("train/no/99.npy", "/nonexistent/deeplense/1.npy")), must=("99.npy",)),
    Case("data_symlink_loop_folder", "data", TRAIN(), variant(symlink("train/no/sub", "..")), expect="any", timeout=120,
         note="a folder symlink pointing to its parent: must not hang"),
    Case("data_unreadable_class_folder", "data", TRAIN(), variant(chmod("train/vort", 0)), must=("vort",),
         root_skip="running as root: chmod 000 does not stop reads"),
    Case("data_unreadable_file", "data", TRAIN(), variant(chain(add_arr("train/no/99.npy", img), chmod("train/no/99.npy", 0))),
         must=("99.npy",), root_skip="running as root: chmod 000 does not stop reads"),
    Case("data_nested_root", "data", TRAIN(), nested_root, must=(ONE_LEVEL,)),
    Case("data_nested_splits", "data", TRAIN(), nested_splits, must=(ONE_LEVEL,)),
    Case("data_empty_folder", "data", TRAIN(), lambda c, d: (d / "data").mkdir(), must=("data",)),
    Case("data_missing", "data", TRAIN("nowhere"), must=("nowhere",)),
    Case("data_is_a_file", "data", TRAIN("one.npy"), lambda c, d: save_npy(d / "one.npy", img()), must=("one.npy",)),
    Case("eval_no_val_split", "data", EVAL("REF", "data"), only_train, expect="warn",
         must=(("every image", "no val", "all images", "whole folder", "no split", "not split"),), needs=("ref",),
         note="a folder without val/: must say it scores every image (no silent 10% split)"),
    Case("eval_nan_pixel", "data", EVAL("REF", "data"), variant(lambda root: (lambda x: (x.__setitem__((0, 5, 5), float("nan")),
         save_npy(root / "val/no/99.npy", x)))(img())), must=("99.npy",), needs=("ref",)),

    # 5. pack / simulate ----------------------------------------------------------------------------------------------
    Case("pack_nan_pixel", "pack", CLI("pack", "data", "--out", "store", "--no-progress"), variant(with_pixel(float("nan"))), must=("99.npy",)),
    Case("pack_evil_pickle_npy", "pack", CLI("pack", "data", "--out", "store", "--no-progress"),
         lambda c, d: variant(lambda root: save_npy(root / "train/no/99.npy", evil_npy(d), allow_pickle=True))(c, d),
         must=("99.npy",), markers=("PWNED",)),
    Case("pack_skip_lists_bad_file", "pack", CLI("pack", "data", "--out", "store", "--no-progress", "--on-error", "skip"),
         variant(add_file("train/no/99.npy", b"")), expect="warn", must=("99.npy",)),
    Case("pack_onto_existing_file", "pack", CLI("pack", "DS", "--out", "notes.txt", "--no-progress"), user_file,
         must=("notes.txt",), keep=("notes.txt",)),
    Case("pack_onto_user_folder", "pack", CLI("pack", "DS", "--out", "mine", "--no-progress"), user_folder,
         must=("mine",), keep=("mine",)),
    Case("pack_workers_negative", "pack", CLI("pack", "DS", "--out", "store", "--workers", "-3", "--no-progress"), must=("workers",)),
    Case("pack_missing_root", "pack", CLI("pack", "nowhere", "--out", "store"), must=("nowhere",)),
    Case("simulate_into_user_folder", "simulate", CLI("simulate", "task1", "--out", "mine", "--n-train", "3", "--n-val", "3", "--device", "cpu"),
         user_folder, must=("mine",), keep=("mine",)),
    Case("simulate_overwrite_user_folder", "simulate",
         CLI("simulate", "task1", "--out", "mine", "--n-train", "3", "--n-val", "3", "--device", "cpu", "--overwrite"),
         user_folder, must=("mine",), keep=("mine",), note="--overwrite replaces a simulated dataset, not any folder"),
    Case("simulate_out_is_file", "simulate", CLI("simulate", "task1", "--out", "notes.txt", "--n-train", "3", "--n-val", "3", "--device", "cpu"),
         user_file, must=("notes.txt",), keep=("notes.txt",)),
    Case("simulate_negative_count", "simulate", CLI("simulate", "task1", "--out", "sim", "--n-train", "-3", "--n-val", "3", "--device", "cpu"),
         must=(("n-train", "n_train"),)),
    Case("simulate_zero_images", "simulate", CLI("simulate", "task1", "--out", "sim", "--n-train", "0", "--n-val", "0", "--device", "cpu"),
         must=(("n-train", "n_train", "no images", "0 images"),)),
    Case("simulate_unknown_preset", "simulate", CLI("simulate", "task1", "--out", "sim", "--preset", "model_x", "--n-train", "3", "--device", "cpu"),
         must=("model_x",)),
    Case("simulate_unknown_task", "simulate", CLI("simulate", "task9", "--out", "sim"), must=("task9",)),
    Case("simulate_bad_device", "simulate", CLI("simulate", "task1", "--out", "sim", "--n-train", "3", "--n-val", "3", "--device", "gpu7"),
         must=("gpu7",)),

    # 6. bad option values ------------------------------------------------------------------------------------------
    Case("train_epochs_0", "options", TRAIN("DS", "run", "--epochs", "0"), must=("epochs",)),
    Case("train_epochs_negative", "options", TRAIN("DS", "run", "--epochs", "-2"), must=("epochs",)),
    Case("train_batch_size_0", "options", TRAIN("DS", "run", "--batch-size", "0"), must=("batch",)),
    Case("train_lr_negative", "options", TRAIN("DS", "run", "--lr", "-0.1"), must=(("lr", "learning rate"),)),
    Case("train_lr_nan", "options", TRAIN("DS", "run", "--lr", "nan"), must=(("lr", "learning rate"),)),
    Case("train_unknown_model", "options", TRAIN("DS", "run", "--model", "resnet9000"), must=("resnet9000",)),
    Case("predict_other_image_size", "options", lambda c, d: ["deeplense", "predict", str(c.ref), "small", "--out", "p.csv", "--device", "cpu"],
         lambda c, d: save_npy(d / "small" / "1.npy", img(shape=(1, 40, 40))), must=("1.npy", "40x40"), needs=("ref",),
         note="a model trained on 150-pixel images asked to score 40-pixel ones (adaptive pooling would score them)"),
    Case("export_opset_not_integer", "options", lambda c, d: ["deeplense", "export", str(c.ref), "--out", "m.onnx", "--opset", "17.5"],
         must=("opset", "17.5"), needs=("ref",), note="argparse's own error: one line, not a usage block"),
    Case("train_unknown_task", "options", TRAIN("DS", "run", "--task", "segmentation"), must=("segmentation",)),
    Case("train_bad_amp", "options", TRAIN("DS", "run", "--amp", "fp8"), must=("fp8",)),
    Case("train_bad_device", "options", TRAIN("DS", "run", "--device", "gpu9"), must=("gpu9",)),
    Case("train_subset_0", "options", TRAIN("DS", "run", "--subset", "0"), must=("subset",)),
    Case("train_val_frac_1_5", "options", TRAIN("data", "run", "--val-frac", "1.5"), only_train, must=(("val-frac", "val_frac"),)),
    Case("train_grad_accum_0", "options", TRAIN("DS", "run", "--grad-accum", "0"), must=(("grad-accum", "grad_accum"),)),
    Case("train_num_workers_negative", "options", TRAIN("DS", "run", "--num-workers", "-1"), must=(("num-workers", "num_workers"),)),
    Case("train_ema_above_1", "options", TRAIN("DS", "run", "--ema", "2"), must=("ema",)),
    Case("train_bad_balance", "options", TRAIN("DS", "run", "--balance", "lots"), must=(("balance", "lots"),)),
    Case("eval_bad_threshold", "options", EVAL("REF", "DS", "--threshold", "high"), must=("threshold",), needs=("ref",)),
    Case("eval_threshold_out_of_range", "options", EVAL("REF", "DS", "--threshold", "7"), must=("threshold",), needs=("ref",)),
    Case("eval_batch_size_0", "options", EVAL("REF", "DS", "--batch-size", "0"), must=("batch",), needs=("ref",)),
    Case("eval_split_test_missing", "options", EVAL("REF", "DS", "--split", "test"), must=("test",), needs=("ref",)),
    Case("eval_missing_history", "options", EVAL("REF", "DS", "--history", "nohist.csv"), must=("nohist.csv",), needs=("ref",)),
    Case("eval_out_is_file", "options", EVAL("REF", "DS", "--out", "notes.txt"), user_file,
         must=("notes.txt",), keep=("notes.txt",), needs=("ref",)),
    Case("run_unknown_experiment", "options", CLI("run", "task99", "--out", "exp"), must=("task99",)),
    Case("run_unknown_param", "options", CLI("run", "task1", "-p", "epochz", "3", "--out", "exp"), must=("epochz",)),
    Case("run_bad_param_value", "options",
         CLI("run", "task1", "-p", "epochs", "many", "-p", "n_train", "6", "-p", "n_val", "3", "-p", "quick", "True",
             "-p", "device", "cpu", "-p", "model", "cnn_baseline", "--out", "exp"),
         must=("epochs",), timeout=300, note="type-check -p values before starting a kernel"),
    Case("demo_epochs_0", "options", CLI("demo", "--out", "demo", "--epochs", "0", "--n-train", "6", "--device", "cpu"),
         must=("epochs",), timeout=200),
    Case("info_bad_device", "options", CLI("info", "--device", "gpu9"), must=("gpu9",)),
    Case("list_models_in_chans_0", "options", CLI("list-models", "cnn_baseline", "--params", "--in-chans", "0"),
         must=(("in-chans", "in_chans"),)),
]

# ----------------------------------------------------------------------------------------------------------------
# Running one command
# ----------------------------------------------------------------------------------------------------------------
def _fork_child(argv, cwd, out, err, env):
    "Runs in a process forked from the forkserver (torch + deeplense_nb already imported)."
    os.setsid()
    os.chdir(cwd)
    os.environ.update(env)
    for fd, p in ((1, out), (2, err)):
        f = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); os.dup2(f, fd); os.close(f)
    nul = os.open(os.devnull, os.O_RDONLY); os.dup2(nul, 0); os.close(nul)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    rc = 0
    try:
        if argv[0] == "deeplense":
            sys.argv = ["deeplense", *argv[1:]]
            from deeplense_nb.cli import main
            rc = main(argv[1:])
        elif argv[:2] == ["python", "-c"]:
            sys.argv = ["-c", *argv[3:]]
            exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})
        else: raise SystemExit(f"bad_inputs: cannot run {argv!r} in fork mode")
    except SystemExit as e:
        if e.code is None: rc = 0
        elif isinstance(e.code, int): rc = e.code
        else: print(e.code, file=sys.stderr); rc = 1
    except BaseException:
        import traceback; traceback.print_exc(); rc = 1
    try: sys.stdout.flush(); sys.stderr.flush()
    except Exception: pass
    os._exit(rc & 0xFF if isinstance(rc, int) else 1)

class Runner:
    def __init__(self, mode, deeplense=None):
        self.mode, self.deeplense, self.lock = mode, deeplense, threading.Lock()
        self.env = {"PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
        if mode == "fork":
            import multiprocessing as mp
            os.environ.setdefault("MPLBACKEND", "Agg")
            # children end with os._exit, so the resource tracker would warn about their semaphores at shutdown
            os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")
            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(["numpy", "torch", "torchvision", "matplotlib.pyplot", "sklearn.metrics", "safetensors.torch",
                "deeplense_nb", "deeplense_nb.core", "deeplense_nb.cli", "deeplense_nb.checkpoint", "deeplense_nb.models",
                "deeplense_nb.data", "deeplense_nb.training", "deeplense_nb.callbacks", "deeplense_nb.evaluation",
                "deeplense_nb.simulate", "deeplense_nb.experiments", "deeplense_nb.diffusion", "deeplense_nb.pinn"])
        else:
            self.python = str(Path(deeplense).with_name("python")) if Path(deeplense).with_name("python").exists() else sys.executable

    def run(self, argv, cwd: Path, timeout: float, tag: str):
        out, err = cwd / f".{tag}.stdout", cwd / f".{tag}.stderr"
        t0 = time.time(); timed_out = False
        if self.mode == "fork":
            with self.lock:
                p = self.ctx.Process(target=_fork_child, args=(argv, str(cwd), str(out), str(err), self.env), daemon=False)
                p.start()
            p.join(timeout)
            if p.exitcode is None:
                timed_out = True
                try: os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError: pass
                p.join(10)
            rc = p.exitcode
        else:
            cmd = [self.deeplense, *argv[1:]] if argv[0] == "deeplense" else [self.python, *argv[1:]]
            env = {**os.environ, **self.env}
            with open(out, "wb") as fo, open(err, "wb") as fe:
                p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, start_new_session=True)
                try: rc = p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    try: os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError: pass
                    rc = p.wait()
        rd = lambda f: f.read_text(errors="replace") if f.exists() else ""
        return {"rc": rc, "stdout": rd(out), "stderr": rd(err), "timed_out": timed_out, "seconds": round(time.time() - t0, 1)}

# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------
_FRAME = re.compile(r"\[[^\[\]]*(?:/s|/it)\]")   # the end of a tqdm frame: "[00:01<00:00,  5.2it/s]"
_PROGRESS = re.compile(r"\d+%\|.*\||\d+/\d+ \[|it/s\]|s/it\]|img/s\]")
_WARN = re.compile(r"^\S.*:\d+: \w*Warning: |^\s*(warning|warnings\.warn|note)\b|^\w*Warning: ", re.I)

def _lines(text: str) -> list[str]:
    "Output lines as a terminal shows them, without progress bars (text glued after a bar frame is kept)."
    out = []
    for raw in text.splitlines():
        for seg in raw.split("\r"):
            rest = _FRAME.split(seg)[-1] if _FRAME.search(seg) else seg
            if rest.strip() and not _PROGRESS.search(rest): out.append(rest.rstrip())
        if not raw.strip(): out.append("")
    return out

def error_lines(stderr: str, stdout: str = "") -> list[str]:
    "The lines of an error message: stderr less progress bars, warnings (and their source lines) and argparse usage."
    lines, keep, skip_next, in_usage = _lines(stderr), [], False, False
    for l in lines:
        if not l.strip(): skip_next = False; continue
        if skip_next and l.startswith((" ", "\t")): skip_next = False; continue
        skip_next = False
        if _WARN.search(l): skip_next = True; continue
        if l.startswith("usage:"): in_usage = True; continue
        if in_usage:
            if re.search(r": error: ", l): in_usage = False
            else: continue
        keep.append(l)
    i = next((k for k, l in enumerate(keep) if re.search(r"error|refus|cannot|not found|invalid", l, re.I)), None)
    block = keep[i:] if i is not None else keep
    if not block:  # nothing on stderr: take the last stdout line
        so = [l for l in _lines(stdout) if l.strip()]
        block = so[-1:]
    return block

def _has(text: str, alt) -> bool:
    alts = alt if isinstance(alt, tuple) else (alt,)
    return any(a.lower() in text.lower() for a in alts)

def classify(case: Case, r: dict, changed: dict, multiline_ok: bool = False) -> tuple[str, str]:
    "(category, reason)."
    both = r["stdout"] + "\n" + r["stderr"]
    if changed.get("markers"): return "code execution", f"created {', '.join(changed['markers'])}"
    if changed.get("victims"): return "code execution", f"changed/removed {', '.join(changed['victims'])}"
    if changed.get("keep"): return "data loss", f"changed/removed {', '.join(changed['keep'])}"
    if r["timed_out"]: return "timeout", f"killed after {case.timeout:.0f}s"
    if "Traceback (most recent call last)" in both: return "traceback", "traceback in the output"
    rc = r["rc"]
    if rc is None or rc < 0: return "traceback", f"died from signal {-rc if rc else '?'}"
    if rc == 0:
        if case.expect == "any": return "clear", "accepted (allowed)"
        if case.expect == "warn":
            missing = [m for m in case.must if not _has(both, m)]
            return ("clear", "accepted with a warning") if not missing else ("silently accepted", f"exit 0; no mention of {missing}")
        return "silently accepted", "exit 0"
    err = error_lines(r["stderr"], r["stdout"])
    text = "\n".join(err)
    missing = [m for m in case.must if not _has(text, m)]
    if missing: return "misleading", f"error does not mention {' / '.join(m if isinstance(m, str) else '|'.join(m) for m in missing)}"
    if rc != case.rc: return "misleading", f"exit {rc}, expected {case.rc}"
    if len(err) > 1:
        if not multiline_ok: return "misleading", f"error spans {len(err)} lines"
        return "clear", f"+{len(err) - 1} detail lines"
    return "clear", ""

def first_error_line(r: dict) -> str:
    if r.get("rc") == 0:
        so = [l for l in _lines(r["stdout"]) + _lines(r["stderr"]) if l.strip()]
        return (so[-1] if so else "").strip()
    tb = _lines(r["stderr"] + "\n" + r["stdout"])
    if any("Traceback (most recent call last)" in l for l in tb):  # the exception line: last non-indented line after it
        k = max(i for i, l in enumerate(tb) if "Traceback (most recent call last)" in l)
        exc = [l for l in tb[k + 1:] if l and not l.startswith((" ", "\t")) and not l.startswith("During handling")]
        if exc: return exc[-1].strip()
    e = error_lines(r["stderr"], r["stdout"])
    return e[0].strip() if e else ""

# ----------------------------------------------------------------------------------------------------------------
# Fixtures and the driver
# ----------------------------------------------------------------------------------------------------------------
class Ctx:
    pass

def build_fixtures(runner: Runner, root: Path, log) -> Ctx:
    c = Ctx(); c.root = root; c.failed = {}
    fx = root / "fixtures"; fx.mkdir(parents=True)
    c.sim, c.ds, c.ref, c.lf = fx / "sim", fx / "ds", fx / "ref", fx / "lf"
    c.diffusion_ckpt, c.torch_pickle = fx / "diffusion.ckpt", fx / "torch_pickle.ckpt"
    def step(name, argv, timeout=300):
        t = time.time(); r = runner.run(argv, fx, timeout, f"fixture_{name}")
        ok = r["rc"] == 0 and not r["timed_out"]
        log(f"  fixture {name}: {'ok' if ok else 'FAILED'} ({time.time() - t:.0f}s)")
        if not ok:
            c.failed[name] = first_error_line(r) or f"exit {r['rc']}"
            log("    " + "\n    ".join((r["stderr"] or r["stdout"]).strip().splitlines()[-8:]))
        return ok
    if not step("sim", ["deeplense", "simulate", "task1", "--out", str(c.sim), "--n-train", "12", "--n-val", "6", "--device", "cpu", "--seed", "1"]):
        raise SystemExit("bad_inputs: cannot simulate the base dataset; nothing can be measured: " + c.failed["sim"])
    r = runner.run(["python", "-c", "import deeplense_nb; print(deeplense_nb.__file__, deeplense_nb.__version__)"], fx, 120, "where")
    c.package = r["stdout"].strip()
    log(f"  package under test: {c.package}")
    shutil.copytree(c.sim, c.ds, ignore=shutil.ignore_patterns("manifest.json", "truth*"))  # a plain real-layout folder
    c.ds_hash = tree_hash(c.ds)
    with ThreadPoolExecutor(2) as ex:
        futs = {
            "ref": ex.submit(step, "ref", ["deeplense", "train", "--data", str(c.ds), "--out", str(c.ref), *TRAIN_BASE]),
            "lf": ex.submit(step, "lf", ["deeplense", "simulate", "lens-finding", "--out", str(c.lf), "--n-train-lenses", "2",
                                         "--n-test-lenses", "2", "--train-ratio", "2", "--test-ratio", "2", "--device", "cpu"]),
        }
        futs["diffusion_ckpt"] = ex.submit(step, "diffusion_ckpt", ["python", "-c", textwrap.dedent("""
            import sys
            try: from deeplense_nb.checkpoint import save_checkpoint
            except ImportError: from deeplense_nb.training import save_checkpoint
            from deeplense_nb.diffusion import GaussianDiffusion, UNetConfig
            gd = GaussianDiffusion(UNetConfig(base_width=8, channel_mults=(1, 2), blocks_per_level=1, attn_levels=(), mid_attn=False,
                                              heads=1, groups=4), image_size=32, timesteps=10)
            save_checkpoint(sys.argv[1], gd.state_dict(), meta={"model_config": gd.model_config, "config": {"kind": "diffusion"}, "epoch": 0})
            """), str(c.diffusion_ckpt)])
        futs["torch_pickle"] = ex.submit(step, "torch_pickle", ["python", "-c", textwrap.dedent("""
            import sys, torch
            torch.save({"model": {"w": torch.zeros(3)}, "epoch": 1, "model_name": "cnn_baseline"}, sys.argv[1])
            """), str(c.torch_pickle)])
        c.have = {k: f.result() for k, f in futs.items()}
    return c

def case_dir_setup(c: Ctx, case: Case, d: Path) -> dict:
    if case.setup: case.setup(c, d)
    return {"victims": {v: tree_hash(d / v) for v in case.victims}, "keep": {k: tree_hash(d / k) for k in case.keep},
            "json": {k: _read_json(d / k) for k, _ in case.keep_json}}

def _read_json(p: Path):
    try: return json.loads(p.read_text())
    except (OSError, ValueError) as e: return f"<unreadable: {type(e).__name__}>"

def json_changes(before, after, ignore=()) -> list[str]:
    "Top-level keys whose values differ (ignoring `ignore`), as 'key: old -> new'."
    if not (isinstance(before, dict) and isinstance(after, dict)): return [] if before == after else [f"{before!r:.60} -> {after!r:.60}"]
    out = []
    for k in sorted(set(before) | set(after)):
        if k in ignore or before.get(k) == after.get(k): continue
        out.append(f"{k}: {json.dumps(before.get(k))[:40]} -> {json.dumps(after.get(k))[:40]}")
    return out

def run_case(runner: Runner, c: Ctx, case: Case, scale: float, multiline_ok: bool = False) -> dict:
    d = c.root / "cases" / case.name; d.mkdir(parents=True)
    res = {"case": case.name, "group": case.group, "expect": case.expect, "rc": None, "seconds": 0.0, "note": case.note}
    missing = [n for n in case.needs if not c.have.get(n)]
    if missing:
        res.update(category="skipped", reason=f"fixture {missing[0]} failed: {c.failed.get(missing[0], '?')}", error=""); return res
    if case.root_skip and IS_ROOT:
        res.update(category="skipped", reason=case.root_skip, error=""); return res
    try: before = case_dir_setup(c, case, d)
    except Exception as e:
        res.update(category="skipped", reason=f"setup failed: {type(e).__name__}: {e}", error=""); return res
    argv = case.argv(c, d)
    r = runner.run(argv, d, case.timeout * scale, "cmd")
    for p in d.rglob("*"):  # undo chmod 000 so the folder can be inspected and removed
        try:
            if not p.is_symlink(): os.chmod(p, 0o755 if p.is_dir() else 0o644)
        except OSError: pass
    changed = {"markers": [m for m in case.markers if os.path.lexists(d / m)],
               "victims": [v for v, h in before["victims"].items() if tree_hash(d / v) != h],
               "keep": [k for k, h in before["keep"].items() if tree_hash(d / k) != h]}
    for k, ign in case.keep_json:
        diff = json_changes(before["json"][k], _read_json(d / k), ign)
        if diff: changed["keep"].append(f"{k} ({'; '.join(diff)})")
    cat, why = classify(case, r, changed, multiline_ok)
    res.update(category=cat, reason=why, rc=r["rc"], seconds=r["seconds"], error=first_error_line(r),
               error_line_count=len(error_lines(r["stderr"], r["stdout"])) if r["rc"] else 0,
               argv=" ".join(shlex.quote(a) if not (len(a) > 120) else "'<code>'" for a in argv),
               stdout_tail="\n".join(_lines(r["stdout"])[-15:]), stderr_tail="\n".join(_lines(r["stderr"])[-25:]))
    return res

def select(cases, pattern):
    if not pattern: return cases
    pats = pattern.split(",")
    return [k for k in cases if any(fnmatch.fnmatch(k.name, p) or p in k.name for p in pats)]

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_results/bad_inputs.json", help="JSON results (a folder gets bad_inputs.json)")
    ap.add_argument("--only", default=None, help="comma-separated shell patterns or substrings of case names")
    ap.add_argument("--deeplense", default=None, help="the deeplense executable (subprocess mode; default: beside this python, else PATH)")
    ap.add_argument("--mode", choices=["fork", "subprocess"], default=None,
                    help="fork: one pre-imported forkserver, a forked child per case (default when deeplense_nb imports); "
                         "subprocess: a fresh `deeplense` process per case")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every case's time limit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (fixtures, every case's folder and output)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--multiline-ok", action="store_true",
                    help="count a clean error whose first line is followed by detail lines as clear (default: the issue's "
                         "rule, a one-line error; longer ones are 'misleading')")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any case is traceback/silently accepted/data loss/code execution/timeout")
    a = ap.parse_args(argv)
    cases = select(CASES, a.only)
    if a.list:
        for k in cases: print(f"{k.name:42s} {k.group:12s} {k.expect:6s} {k.note}")
        return 0
    if not cases: print(f"bad_inputs: no case matches {a.only!r}", file=sys.stderr); return 1
    names = [k.name for k in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    mode = a.mode
    if mode is None:
        try: import importlib.util; mode = "fork" if importlib.util.find_spec("deeplense_nb") and not a.deeplense else "subprocess"
        except Exception: mode = "subprocess"
    dl = a.deeplense or (str(Path(sys.executable).with_name("deeplense")) if Path(sys.executable).with_name("deeplense").exists()
                         else shutil.which("deeplense"))
    if mode == "subprocess" and not dl: print("bad_inputs: no deeplense executable; pass --deeplense", file=sys.stderr); return 1
    out = Path(a.out); out = out / "bad_inputs.json" if out.suffix != ".json" else out
    log = lambda s: print(s, flush=True)
    t0 = time.time()
    root = Path(tempfile.mkdtemp(prefix="deeplense_bad_inputs_"))
    log(f"bad_inputs: {len(cases)} cases, mode {mode}, -j {a.jobs}, root {root}{' (root user: chmod cases skipped)' if IS_ROOT else ''}")
    runner = Runner(mode, dl)
    try:
        c = build_fixtures(runner, root, log)
        results, done = [], [0]
        def one(k):
            r = run_case(runner, c, k, a.timeout_scale, a.multiline_ok)
            done[0] += 1
            log(f"  [{done[0]:3d}/{len(cases)}] {k.name:42s} {r['category']:18s} rc={r['rc']!s:4s} {r['seconds']:5.1f}s")
            return r
        with ThreadPoolExecutor(max(1, a.jobs)) as ex:
            results = list(ex.map(one, cases))
        ds_changed = tree_hash(c.ds) != c.ds_hash
    finally:
        if a.keep: log(f"bad_inputs: kept {root}")
        else:
            for p in root.rglob("*"):
                try:
                    if not p.is_symlink() and p.is_dir(): os.chmod(p, 0o755)
                except OSError: pass
            shutil.rmtree(root, ignore_errors=True)
    counts = {k: sum(r["category"] == k for r in results) for k in CATS}
    tried = len(results) - counts["skipped"]
    summary = (f"cases tried {tried} / clear {counts['clear']} / tracebacks {counts['traceback']} / misleading {counts['misleading']} / "
               f"silently accepted {counts['silently accepted']} / data loss {counts['data loss']} / code execution {counts['code execution']}"
               + (f" / timeouts {counts['timeout']}" if counts["timeout"] else "") + (f" (skipped {counts['skipped']})" if counts["skipped"] else ""))
    # table
    w = max(len(r["case"]) for r in results)
    print()
    print(f"{'case':{w}s}  {'category':17s}  {'exit':>4s}  first error line / reason")
    print("-" * (w + 100))
    order = {k: i for i, k in enumerate(["code execution", "data loss", "traceback", "silently accepted", "timeout", "misleading", "clear", "skipped"])}
    for r in sorted(results, key=lambda r: (order[r["category"]], r["group"], r["case"])):
        msg = r["error"] or ""
        if r["category"] not in ("clear",) and r.get("reason"): msg = f"[{r['reason']}] {msg}"
        print(f"{r['case']:{w}s}  {r['category']:17s}  {r['rc']!s:>4s}  {msg[:160]}")
    print()
    if ds_changed: print("note: the shared base dataset was modified by some case (reads must not write into data folders)")
    print(summary)
    print(f"({time.time() - t0:.0f}s, mode {mode})")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"summary": summary, "counts": {"tried": tried, **counts}, "mode": mode, "seconds": round(time.time() - t0, 1),
           "python": sys.version.split()[0], "package": c.package, "root_user": IS_ROOT, "shared_dataset_modified": ds_changed,
           "fixtures_failed": c.failed, "results": results}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    if a.strict and sum(counts[k] for k in BAD) > 0: return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
