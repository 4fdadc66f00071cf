"""deeplense_nb.data: bad input (every case raises naming the file, or is skipped and reported, and nothing else is
lost or altered), layouts, real sample files, the packed store (exact round trip, no-op re-pack, interrupted packs),
loaders, augmentation and the `deeplense pack` command."""
import hashlib, json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np
import pytest
import torch

import deeplense_nb.data as D
import deeplense_nb.data.files as DF, deeplense_nb.data.folders as DFo, deeplense_nb.data.store as DS
from deeplense_nb.core import DeepLenseError
from deeplense_nb.data import (BadFileError, CutMix, DataError, FolderDataset, LayoutError, MixUp, PackedDataset,
                               StoreError, d4_transforms, get_dataloaders, make_toy_dataset, open_dataset, pack,
                               read_npy, scan_layout)

S = 32  # image size of the synthetic datasets
CLASSES = ("a", "b", "c")


def sha(p: Path) -> str: return hashlib.sha1(Path(p).read_bytes()).hexdigest()
def digest(root: Path) -> dict: return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}
def read_all(ds): return ds[np.arange(len(ds))]


def make_good(root: Path, n: int = 4, seed: int = 0) -> Path:
    "Class folders root/{a,b,c}/{1..n}.npy: float64 (1, S, S) in [0, 1], like the Task I files."
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(1, n + 1): np.save(root / c / f"{i}.npy", rng.random((1, S, S)))
    return root


def good_arrays(root: Path) -> dict:
    return {f"{c}/{i}.npy": np.load(root / c / f"{i}.npy").astype(np.float32) for c in CLASSES for i in range(1, 5)}


# ---------------------------------------------------------------------------------------------------------------------
# the bad-input matrix: (writer of the bad file, text the error must contain, problem found from the header alone?)
def _truncated(p, rng): np.save(p, rng.random((1, S, S))); p.write_bytes(p.read_bytes()[:300])
def _garbage(p, rng): p.write_bytes(bytes(rng.integers(0, 256, 600, dtype=np.uint8)))
def _bad_header(p, rng): p.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f8, garbage" + b" " * 40)
def _empty(p, rng): p.write_bytes(b"")
def _wrong_shape(p, rng): np.save(p, rng.random((1, S + 4, S + 4)))
def _nan(p, rng): a = rng.random((1, S, S)); a[0, 3, 4] = np.nan; np.save(p, a)
def _inf(p, rng): a = rng.random((1, S, S)); a[0, 0, 0] = np.inf; np.save(p, a)
def _constant(p, rng): np.save(p, np.full((1, S, S), 0.25))
def _object(p, rng): np.save(p, np.array([rng.random((S, S)), 1e-23], dtype=object), allow_pickle=True)
def _flat_label(p, rng): np.save(p, np.append(rng.random(S * S), 2.0))
def _four_d(p, rng): np.save(p, rng.random((2, 1, S, S)))
def _strings(p, rng): np.save(p, np.array(["no", "vort"]))
def _channel_last(p, rng): np.save(p, rng.random((S, S, 3)))
def _npz(p, rng): np.savez(p.with_suffix(""), a=rng.random((1, S, S))); p.with_suffix(".npz").rename(p)

BAD = {
    "truncated": (_truncated, "is truncated", True),
    "garbage": (_garbage, "magic", True),
    "bad_header": (_bad_header, "not a readable .npy file", True),
    "empty_file": (_empty, "not a readable .npy file", True),
    "wrong_shape": (_wrong_shape, f"has shape (1, {S + 4}, {S + 4}) but the rest of the dataset is (1, {S}, {S})", True),
    "nan": (_nan, "1 NaN/Inf value", False),
    "inf": (_inf, "1 NaN/Inf value", False),
    "constant": (_constant, "constant image", False),
    "object_array": (_object, "allow_pickle=True", True),
    "flattened_with_label": (_flat_label, f"flattened (1, {S}, {S}) image with a label appended", True),
    "4d": (_four_d, "4-D array", True),
    "strings": (_strings, "unicode strings", True),
    "channel_last_rgb": (_channel_last, f"has shape (3, {S}, {S}) but the rest of the dataset is (1, {S}, {S})", True),
    "npz": (_npz, "not a readable .npy file", True),
}


@pytest.fixture
def bad_dataset(tmp_path, request):
    "A class-folder dataset of 12 good files plus b/bad.npy of the requested kind; yields (root, bad path, digest)."
    root = make_good(tmp_path / "ds")
    write, _, _ = BAD[request.param]
    bad = root / "b" / "bad.npy"
    write(bad, np.random.default_rng(1))
    return root, bad, digest(root)


def test_channel_last_files_read_as_channels_first(tmp_path):
    "A dataset saved as (H, W, 1) (or (H, W, C)) reads exactly like the same pixels saved as (C, H, W), packed or not."
    root = make_good(tmp_path / "chw")
    hwc = tmp_path / "hwc"
    for rel, a in good_arrays(root).items():
        (hwc / rel).parent.mkdir(parents=True, exist_ok=True); np.save(hwc / rel, np.moveaxis(a, 0, -1))
    want = read_all(FolderDataset(root))[0].numpy()
    np.testing.assert_array_equal(read_all(FolderDataset(hwc))[0].numpy(), want)
    np.testing.assert_array_equal(read_all(PackedDataset(pack(hwc, tmp_path / "store", progress=False)))[0].numpy(), want)


@pytest.mark.parametrize("bad_dataset", list(BAD), indirect=True)
def test_bad_file_raises_naming_the_file(bad_dataset, tmp_path, request):
    root, bad, before = bad_dataset
    _, msg, header_level = BAD[request.node.callspec.params["bad_dataset"]]
    with pytest.raises(BadFileError) as ei:
        ds = FolderDataset(root)  # header problems are found here, without reading pixels
        assert not header_level, "a header-level problem must be found when the dataset is built"
        read_all(ds)              # pixel problems when the file is read
    assert str(bad) in str(ei.value) and msg in str(ei.value), str(ei.value)
    assert ei.value.path == str(bad) and isinstance(ei.value, DeepLenseError)
    with pytest.raises(BadFileError, match="bad.npy"):
        pack(root, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob(".store*"))
    assert digest(root) == before  # nothing on disk was touched


@pytest.mark.parametrize("bad_dataset", list(BAD), indirect=True)
def test_bad_file_skipped_and_reported(bad_dataset, tmp_path, request, capsys):
    root, bad, before = bad_dataset
    _, msg, _ = BAD[request.node.callspec.params["bad_dataset"]]
    good = good_arrays(root)
    ds = FolderDataset(root, on_error="skip")
    assert [s.path for s in ds.skipped] == [str(bad)] and msg in ds.skipped[0].reason
    assert "bad.npy" in capsys.readouterr().out  # the report is printed too
    assert [str(p.relative_to(root)) for p in ds.files] == list(good)  # every good file, in order, nothing substituted
    x, y = read_all(ds)
    np.testing.assert_array_equal(x.numpy(), np.stack(list(good.values())))
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    res = pack(root, tmp_path / "store", on_error="skip", progress=False)
    assert res.n == 12 and res.skipped.paths == [str(bad)]
    ix = json.loads((res.path / "index.json").read_text())
    assert ix["skipped"][0]["path"] == str(bad) and msg in ix["skipped"][0]["reason"]
    assert [f["path"] for f in ix["files"]] == list(good)
    np.testing.assert_array_equal(read_all(PackedDataset(res))[0].numpy(), np.stack(list(good.values())))
    assert digest(root) == before


def test_object_arrays_need_opt_in(tmp_path):
    root = make_good(tmp_path / "ds")
    _object(root / "b" / "5.npy", np.random.default_rng(0))
    with pytest.raises(BadFileError, match="can execute arbitrary code"): FolderDataset(root)
    ds = FolderDataset(root, allow_pickle=True)
    assert len(ds) == 13 and ds.shape == (1, S, S)
    img, mass = read_npy(root / "b" / "5.npy", allow_pickle=True, with_extra=True)
    assert mass == 1e-23 and img.dtype == np.float32
    res = pack(root, tmp_path / "store", allow_pickle=True, progress=False)
    np.testing.assert_array_equal(PackedDataset(res)[8][0].numpy(), img)


def test_file_variants_are_converted(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.random((S, S))
    np.save(tmp_path / "hw.npy", a); np.save(tmp_path / "chw.npy", a[None]); np.save(tmp_path / "i.npy", (a * 255).astype(np.uint8))
    for name in ("hw.npy", "chw.npy"):
        x = read_npy(tmp_path / name)
        assert x.shape == (1, S, S) and x.dtype == np.float32
        np.testing.assert_array_equal(x, a[None].astype(np.float32))
    assert read_npy(tmp_path / "i.npy").dtype == np.float32


def test_empty_class_folder(tmp_path):
    root = make_good(tmp_path / "ds"); (root / "d").mkdir()
    with pytest.raises(LayoutError, match=r"/d: empty folder"): FolderDataset(root)
    ds = FolderDataset(root, on_error="skip")
    assert ds.skipped.paths == [str(root / "d")] and len(ds) == 12 and ds.classes == ["a", "b", "c", "d"]


def test_missing_and_unexpected_task1_folders(tmp_path):
    root = make_toy_dataset(tmp_path / "t1", n_per_class=4, img_size=S)
    (root / "val" / "vort").rename(root / "val" / "vortex")  # an unofficial name: not read, and said so
    before = digest(root)
    with pytest.raises(LayoutError) as ei: FolderDataset(root)
    msg = str(ei.value)
    assert f"{root / 'val' / 'vort'}: missing class folder" in msg and "vortex: unexpected folder" in msg
    assert "task1    ROOT/train/{no,sphere,vort}/N.npy" in msg and "vortex/" in msg  # expected tree and what was found
    ds = FolderDataset(root, on_error="skip")
    assert len(ds.skipped) == 2 and len(ds) == 3 * 4 + 2 * 1
    assert digest(root) == before


def test_missing_root_and_file_root(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"): FolderDataset(tmp_path / "nope")
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(LayoutError, match="is a file"): FolderDataset(tmp_path / "x.npy")
    with pytest.raises(DataError, match="expected one of 'raise', 'skip'"): FolderDataset(tmp_path, on_error="ignore")


def test_pack_reads_each_file_once(tmp_path, monkeypatch):
    root = make_good(tmp_path / "ds")
    calls = []
    orig = DF._decode
    for m in (DF, DFo, DS):  # every module of the subpackage that reads through _decode
        monkeypatch.setattr(m, "_decode", lambda p, *a, **k: calls.append(str(p)) or orig(p, *a, **k))
    FolderDataset(root)
    assert sorted(calls) == sorted(str(p) for p in root.rglob("*.npy"))  # opening checks every file's pixels, once each
    calls.clear()
    pack(root, tmp_path / "store", progress=False)
    assert sorted(calls) == sorted(str(p) for p in root.rglob("*.npy"))  # exactly once each


# ---------------------------------------------------------------------------------------------------------------------
# layouts
def test_layouts_detected(tmp_path):
    t1 = make_toy_dataset(tmp_path / "t1", layout="task1", n_per_class=4, img_size=S)
    t2 = make_toy_dataset(tmp_path / "t2", layout="task2", n_per_class=4, img_size=S)
    t4 = make_toy_dataset(tmp_path / "t4", layout="task4", n_per_class=11, img_size=S)
    fo = make_toy_dataset(tmp_path / "fo", layout="folders", n_per_class=3, img_size=S)
    l1, l2, l4, lf = (scan_layout(p) for p in (t1, t2, t4, fo))
    assert (l1.kind, l1.classes, l1.split_names) == ("task1", ["no", "sphere", "vort"], ("train", "val"))
    assert (l2.kind, l2.classes, l2.split_names) == ("task2", ["nonlens", "lens"], ("train", "test"))
    assert {f.split("/")[0]: int(l) for f, l in zip(l2.files, l2.labels)} == \
        {"train_nonlenses": 0, "train_lenses": 1, "test_nonlenses": 0, "test_lenses": 1}
    assert (l4.kind, l4.classes, set(l4.labels.tolist())) == ("task4", [], {-1})
    assert l4.files[8:11] == ["Samples/sample9.npy", "Samples/sample10.npy", "Samples/sample11.npy"]  # natural sort
    assert (lf.kind, lf.classes, lf.split_names) == ("folders", ["no", "sphere", "vort"], ("all",))
    for i in (10, 11): np.save(fo / "no" / f"{i}.npy", np.random.rand(1, S, S))
    assert [f for f in scan_layout(fo).files if f.startswith("no/")] == ["no/1.npy", "no/2.npy", "no/3.npy", "no/10.npy", "no/11.npy"]


def test_split_class_folders_and_lens_names(tmp_path):
    for p in ("s/train/x", "s/train/y", "s/test/x", "s/test/y", "l/lenses", "l/nonlenses"):
        (tmp_path / p).mkdir(parents=True); np.save(tmp_path / p / "1.npy", np.random.rand(S, S))
    s = scan_layout(tmp_path / "s")
    assert (s.kind, s.classes, s.split_names) == ("folders", ["x", "y"], ("train", "test"))
    l = scan_layout(tmp_path / "l")
    assert l.classes == ["nonlens", "lens"] and l.labels[l.files.index("lenses/1.npy")] == 1


def test_layout_mistakes_show_trees(tmp_path):
    t2 = make_toy_dataset(tmp_path / "t2", layout="task2", n_per_class=2, img_size=S)
    nested = tmp_path / "nested"
    for d in ("train_lenses", "train_nonlenses"): (nested / "train").mkdir(parents=True, exist_ok=True); (t2 / d).rename(nested / "train" / d)
    with pytest.raises(LayoutError) as ei: scan_layout(nested)
    m = str(ei.value)
    assert "nested one level too deep" in m and "train_lenses/" in m and "task2    ROOT/train_lenses/N.npy" in m
    with pytest.raises(LayoutError, match="pass the folder above it"): scan_layout(nested / "train" / "train_lenses")
    t1 = make_toy_dataset(tmp_path / "wrap" / "dataset", n_per_class=2, img_size=S)
    with pytest.raises(LayoutError, match="one level too high"): scan_layout(tmp_path / "wrap")
    with pytest.raises(LayoutError, match="looks like the 'train' split"): scan_layout(t1 / "train")
    assert scan_layout(t1 / "train", layout="folders").classes == ["no", "sphere", "vort"]


# ---------------------------------------------------------------------------------------------------------------------
# real samples (../shared/deeplense_samples; skipped when absent; never copied)
def test_real_task1_samples(real_samples):
    ds = open_dataset(real_samples / "common_test_I")
    assert (ds.layout, ds.classes, ds.shape, len(ds)) == ("folders", ["no", "sphere", "vort"], (1, 150, 150), 15)
    x, y = read_all(ds)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [["no", "sphere", "vort"].index(f.parent.name) for f in ds.files]
    for f, xi in zip(ds.files, x):
        a = np.load(f); assert a.dtype == np.float64 and a.shape == (1, 150, 150)
        np.testing.assert_array_equal(xi.numpy(), a.astype(np.float32))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_real_task2_samples(real_samples, tmp_path):
    root = real_samples / "specific_test_II"
    before = digest(root)
    ds = open_dataset(root)
    assert (ds.layout, ds.classes, ds.shape, ds.split_names) == ("task2", ["nonlens", "lens"], (3, 64, 64), ("train", "test"))
    x, y = read_all(ds)
    assert y.tolist() == [int(f.parent.name.endswith("_lenses")) for f in ds.files] and sum(y.tolist()) == 10
    res = pack(root, tmp_path / "t2.packed", progress=False)
    np.testing.assert_array_equal(read_all(PackedDataset(res))[0].numpy(), x.numpy())
    dls = get_dataloaders(res, task="lens-finding", batch_size=4)
    assert (dls.in_chans, dls.img_size, len(dls.test.dataset)) == (3, 64, 10)
    assert digest(root) == before and not list(root.rglob(".*"))


# ---------------------------------------------------------------------------------------------------------------------
# packed store
def test_pack_round_trip_exact_and_noop(tmp_path, capsys):
    root = make_toy_dataset(tmp_path / "t1", n_per_class=6, img_size=S)
    res = pack(root, tmp_path / "t1.packed", progress=False)
    ix = json.loads((res.path / "index.json").read_text())
    assert ix["complete"] and ix["n"] == 18 + 3 and ix["manifest"]["layout"] == "task1"
    ds = PackedDataset(res)
    for i, f in enumerate(ix["files"]):
        src = root / f["path"]
        assert f["sha1"] == sha(src)
        np.testing.assert_array_equal(ds[i][0].numpy(), np.load(src).astype(np.float32))  # exact in float32
        assert int(ds[i][1]) == f["label"] and ds.split_of[i] == f["split"]
    mtime = (res.path / "images.bin").stat().st_mtime_ns
    capsys.readouterr()
    again = pack(root, tmp_path / "t1.packed")
    assert again.up_to_date and "up to date" in capsys.readouterr().out
    assert (res.path / "images.bin").stat().st_mtime_ns == mtime
    np.save(root / "train" / "no" / "1.npy", np.random.rand(1, S, S))  # the source changes: packed again
    third = pack(root, tmp_path / "t1.packed", progress=False)
    assert not third.up_to_date
    np.testing.assert_array_equal(PackedDataset(third)[0][0].numpy(), np.load(root / "train/no/1.npy").astype(np.float32))
    assert pack(root, tmp_path / "t1.packed", dtype="float16", progress=False).dtype == "float16"  # settings are in the fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1", "t1.packed"]  # no temporary folders left


def test_interrupted_pack_leaves_nothing_valid(tmp_path, monkeypatch):
    root = make_good(tmp_path / "ds")
    old = pack(root, tmp_path / "store", progress=False)
    np.save(root / "a" / "1.npy", np.random.rand(1, S, S))
    calls = [0]
    orig = DS._read_one
    def boom(p, allow_pickle):
        calls[0] += 1
        if calls[0] == 6: raise RuntimeError("disk on fire")
        return orig(p, allow_pickle)
    monkeypatch.setattr(DS, "_read_one", boom)
    for out in (tmp_path / "fresh", tmp_path / "store"):
        calls[0] = 0
        with pytest.raises(RuntimeError, match="disk on fire"): pack(root, out, progress=False, workers=1)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "store"]  # temporary folders removed
    assert PackedDataset(tmp_path / "store").index["source"]["fingerprint"] == json.loads((old.path / "index.json").read_text())["source"]["fingerprint"]


def test_killed_pack_leaves_nothing_valid(tmp_path):
    root = make_good(tmp_path / "ds", n=20)
    out = tmp_path / "store"
    script = textwrap.dedent(f"""
        import time, deeplense_nb.data.store as D
        orig = D._read_one
        def slow(p, allow_pickle):
            time.sleep(0.05); return orig(p, allow_pickle)
        D._read_one = slow
        D.pack({str(root)!r}, {str(out)!r}, progress=False, workers=1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    tmp_dirs = []
    while time.time() < deadline and proc.poll() is None:
        tmp_dirs = [d for d in tmp_path.glob(".store.tmp-*") if (d / "images.bin").is_file() and (d / "images.bin").stat().st_size > 0]
        if tmp_dirs: break
        time.sleep(0.02)
    assert tmp_dirs and proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert not out.exists()
    for d in tmp_dirs:  # what the killed process left never reads as a store
        with pytest.raises(StoreError, match="interrupted pack"): PackedDataset(d)
        with pytest.raises(StoreError): open_dataset(d)
    with pytest.raises(StoreError, match="does not exist"): PackedDataset(out)
    res = pack(root, out, progress=False)  # a new pack works and removes the dead process's leftovers
    assert res.n == 60 and not any(d.exists() for d in tmp_dirs)


def test_damaged_store_refused(tmp_path):
    res = pack(make_good(tmp_path / "ds"), tmp_path / "store", progress=False)
    ip = res.path / "index.json"
    ix = json.loads(ip.read_text())
    ip.write_text(json.dumps({**ix, "complete": False}))
    with pytest.raises(StoreError, match="incomplete"): PackedDataset(res)
    ip.write_text(json.dumps(ix))
    with open(res.path / "images.bin", "ab") as f: f.write(b"\0" * 8)
    with pytest.raises(StoreError, match="truncated or replaced"): PackedDataset(res)
    other = tmp_path / "notes"; other.mkdir(); (other / "x.txt").write_text("mine")
    with pytest.raises(DataError, match="is not a packed store; refusing to replace it"): pack(tmp_path / "ds", other, progress=False)
    assert (other / "x.txt").read_text() == "mine"


def test_packed_memory_modes_agree(tmp_path):
    res = pack(make_toy_dataset(tmp_path / "t2", layout="task2", n_per_class=3, img_size=S), tmp_path / "s", progress=False)
    idx = [5, 0, 3, 3, 11]
    ref = PackedDataset(res)[idx]
    x, y = PackedDataset(res, in_memory=True)[idx]
    assert torch.equal(x, ref[0]) and torch.equal(y, ref[1])
    x, y = D.DeviceData(PackedDataset(res), "cpu").take(torch.tensor(idx))   # held as one tensor: the device path
    assert torch.equal(x, ref[0]) and torch.equal(y, ref[1])
    test = PackedDataset(res, split="test", in_memory=True)
    assert set(test.split_of) == {"test"} and all(f.startswith("test_") for f in test.files)
    with pytest.raises(DataError, match="expected one of 'train', 'test'"): PackedDataset(res, split="val")


# ---------------------------------------------------------------------------------------------------------------------
# loaders
def test_get_dataloaders_task1_uses_val(tmp_path):
    root = make_toy_dataset(tmp_path / "t1", n_per_class=8, img_size=S)
    for data in (root, pack(root, tmp_path / "t1.packed", progress=False)):
        dls = get_dataloaders(data, task="substructure", batch_size=5)
        assert (len(dls.train.dataset), len(dls.valid.dataset), dls.test) == (24, 6, None)
        assert set(dls.train.dataset.split_of) == {"train"} and set(dls.valid.dataset.split_of) == {"val"}
        assert (dls.classes, dls.in_chans, dls.img_size) == (["no", "sphere", "vort"], 1, S)
        x, y = dls.train.one_batch()
        assert x.shape == (5, 1, S, S) and x.dtype == torch.float32 and y.shape == (5,) and y.dtype == torch.int64
        assert sum(len(b[1]) for b in dls.valid) == 6 and len(dls.train) == 4  # drop_last on train only


def test_get_dataloaders_task2_split_and_test(tmp_path):
    root = make_toy_dataset(tmp_path / "t2", layout="task2", n_per_class=10, img_size=S)  # 10 lenses, 40 non-lenses
    dls = get_dataloaders(root, task="lens-finding", batch_size=8, seed=3)
    tr, va, te = dls.train.dataset, dls.valid.dataset, dls.test.dataset
    assert (len(tr), len(va), len(te)) == (45, 5, 2 + 8)
    assert np.bincount(va.labels).tolist() == [4, 1]  # stratified 90:10 of the train folders
    assert not set(map(str, tr.files)) & set(map(str, va.files)) and set(te.split_of) == {"test"}
    again = get_dataloaders(root, task="lens-finding", batch_size=8, seed=3)
    assert list(map(str, again.valid.dataset.files)) == list(map(str, va.files))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(dls.train, again.train))  # seeded order
    other = get_dataloaders(root, batch_size=8, seed=4)
    assert list(map(str, other.valid.dataset.files)) != list(map(str, va.files))


def test_get_dataloaders_options(tmp_path):
    root = make_toy_dataset(tmp_path / "fo", layout="folders", n_per_class=20, img_size=S)
    dls = get_dataloaders(root, batch_size=6, subset=0.5, augment=False)
    assert (len(dls.train.dataset), len(dls.valid.dataset)) == (27, 3)
    assert np.bincount(dls.train.dataset.labels).tolist() == [9, 9, 9]
    with pytest.raises(DataError, match="expected one of None, 'substructure', 'lens-finding'"): get_dataloaders(root, task="detection")
    with pytest.raises(DataError, match="needs the classes \\['nonlens', 'lens'\\]"): get_dataloaders(root, task="lens-finding")
    with pytest.raises(DataError, match="minority:majority ratio"): get_dataloaders(root, balance="oversample")
    with pytest.raises(DataError, match="fraction in \\(0, 1\\]"): get_dataloaders(root, subset=2.0)


def test_balance_reaches_ratio(tmp_path):
    root = make_toy_dataset(tmp_path / "t2", layout="task2", n_per_class=6, nonlens_ratio=10, img_size=16)
    store = pack(root, tmp_path / "s", progress=False)
    for balance, want in ((0.2, 0.2), ("weighted", 1.0)):
        ys = []
        for e in range(60):
            dls = get_dataloaders(store, batch_size=16, balance=balance, seed=e, augment=False)
            ys += [int(v) for _, y in dls.train for v in y]
        lens = np.mean(ys)
        assert abs(lens / (1 - lens) - want) < 0.15 * want, (balance, lens)


def test_loader_on_device_and_workers(tmp_path):
    store = pack(make_good(tmp_path / "ds", n=8), tmp_path / "s", progress=False)
    dls = get_dataloaders(store, batch_size=4, device="cpu")
    assert dls.train.device == torch.device("cpu") and dls.train.one_batch()[0].device.type == "cpu"
    dlw = get_dataloaders(store, batch_size=4, num_workers=2, augment=False)
    ref = get_dataloaders(store, batch_size=4, augment=False)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(dlw.train, ref.train))  # same batches with worker processes
    if not torch.cuda.is_available():
        with pytest.raises(DeepLenseError, match="CUDA is not available"): get_dataloaders(store, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_gpu(tmp_path):
    store = pack(make_good(tmp_path / "ds", n=8), tmp_path / "s", progress=False)
    dls = get_dataloaders(store, batch_size=4, device="cuda")
    x, y = dls.train.one_batch()
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
    xm, ym = MixUp(0.4, 3, seed=0)(x, y)
    assert xm.is_cuda and ym.shape == (4, 3)


# ---------------------------------------------------------------------------------------------------------------------
# augmentation contracts
def test_d4_and_batch_mixing():
    x = torch.rand(6, 2, 8, 8)
    vs = d4_transforms(x)
    assert len(vs) == 8 and torch.equal(vs[0], x) and len({v.numpy().tobytes() for v in vs}) == 8
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for T in (MixUp, CutMix):
        xm, ys = T(1.0, 3, seed=0)(x, y)
        assert xm.shape == x.shape and ys.shape == (6, 3) and ys.dtype == torch.float32
        assert torch.allclose(ys.sum(1), torch.ones(6))  # (torch.testing imports torch.distributed: 10 s)
    aug = D.default_augment(seed=0)
    out = aug(x)
    assert out.shape == x.shape and any(not torch.equal(out[i], x[i]) for i in range(6))
    assert all(any(torch.equal(out[i], v) for v in d4_transforms(x[i])) for i in range(6))


# ---------------------------------------------------------------------------------------------------------------------
# CLI
def test_cli_pack(tmp_path, cli, capsys):
    from deeplense_nb.cli import main
    root = make_good(tmp_path / "ds")
    _constant(root / "c" / "9.npy", None)
    out = tmp_path / "store"
    assert main(["pack", str(root), "--out", str(out)]) == 2  # in-process: the subprocess start costs seconds
    err = capsys.readouterr().err
    assert "9.npy" in err and "constant image" in err and "Traceback" not in err and not out.exists()
    r = cli("pack", root, "--out", out, "--on-error", "skip", "--dtype", "float16")  # the console entry point, end to end
    assert "packed 12 images" in r.stdout and "9.npy: is a constant image" in r.stdout
    assert PackedDataset(out).dtype == np.float16 and len(PackedDataset(out).skipped) == 1
    assert main(["pack", str(root), "--out", str(out), "--on-error", "skip", "--dtype", "float16", "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
