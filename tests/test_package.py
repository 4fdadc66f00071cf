"""Packaging and CLI basics: version, console script, info, one-line user errors, README in sync."""
import json, shutil, subprocess, sys, tomllib
import deeplense_nb

def test_version_matches_pyproject(root):
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    assert cfg["project"]["dynamic"] == ["version"]
    assert cfg["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "deeplense_nb.__version__"
    assert deeplense_nb.__version__.count(".") == 2

def test_nbdev_settings(root):
    nb = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["nbdev"]
    assert set(nb["tst_flags"].split()) == {"notest", "slow", "cuda"}
    assert nb["allowed_cell_metadata_keys"] == ["tags"]
    assert not (root / "settings.ini").exists()

def test_info_json(cli):
    r = cli("info", "--json")
    info = json.loads(r.stdout)
    for k in ("deeplense_nb", "torch", "torchvision", "device"): assert k in info
    assert info["deeplense_nb"] == deeplense_nb.__version__
    assert not info["torchvision"].startswith("unavailable")

def test_console_script_installed():
    exe = shutil.which("deeplense", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "the `deeplense` console script is not installed next to the interpreter"
    r = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "torchvision" in r.stdout and "device" in r.stdout

def test_user_error_is_one_line(cli):
    r = cli("info", "--device", "tpu", check=False)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Unknown device 'tpu'" in r.stderr
    assert "Traceback" not in r.stderr

def test_help_on_every_command(cli, capsys):
    "Every command's --help, in one process (a process per command paid a torch import each); the console script once."
    from deeplense_nb.cli import available_commands, main
    cmds = available_commands()
    assert {"info", "demo"} <= set(cmds)
    for name in cmds:
        try: main([name, "--help"])
        except SystemExit as e: assert e.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith("usage: deeplense " + name), out
    assert cli("train", "--help").stdout.startswith("usage: deeplense train")

def test_readme_in_sync(root):
    r = subprocess.run([sys.executable, str(root / "tools" / "readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "make demo" in (root / "README.md").read_text()
