"""lego_core.cli: the train -> locate -> disassemble -> assemble -> evaluate ->
predict -> routes flow on tiny MNIST archives, every command's --help, and bad
input ending in one `lego: error:` line with exit code 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from lego_core import (
    DEFAULT_SCALING,
    MNIST_SPEC,
    Components,
    load_exported,
    load_image_folder,
    shared_data_dir,
)
from lego_core.cli import main, parse_names, parse_spec, parse_threshold, run_command

COMMANDS = ("train", "locate", "disassemble", "assemble", "evaluate", "predict", "routes")
DIGITS = ["0", "1", "2", "7", "8", "9"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 40, 20


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def write_archive(path: Path, data, rows_per_class: range) -> None:
    """ImageFolder tar.gz `<split>/<class>/<n>.png` of some rows of each class."""
    split = path.name.split(".")[0]
    with tarfile.open(path, "w:gz") as tf:
        for label, name in enumerate(data.class_names):
            members = torch.nonzero(data.labels == label).flatten()
            for j in rows_per_class:
                buf = io.BytesIO()
                Image.fromarray(data.images[members[j], 0].numpy()).save(buf, "PNG")
                info = tarfile.TarInfo(f"{split}/{name}/{j:03d}.png")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny train/test archives, two LeNets (digits 0-2 and 7-9) and their
    components, made with the CLI itself."""
    root = tmp_path_factory.mktemp("cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEGO_CACHE_DIR", str(root / "cache"))
        source = shared_data_dir() / "mnist-test.tar.gz"
        assert source.is_file(), f"{source} is missing; set LEGO_DATA_DIR"
        digits = load_image_folder(
            source,
            MNIST_SPEC,
            classes=DIGITS,
            per_class_limit=TRAIN_PER_CLASS + TEST_PER_CLASS,
            progress=False,
        )
        write_archive(root / "train.tar.gz", digits, range(TRAIN_PER_CLASS))
        write_archive(
            root / "test.tar.gz", digits, range(TRAIN_PER_CLASS, TRAIN_PER_CLASS + TEST_PER_CLASS)
        )
        ws = {"root": root, "train": root / "train.tar.gz", "test": root / "test.tar.gz"}
        for key, classes, seed in (("1", "0,1,2", 0), ("2", "7,8,9", 1)):
            model, comps = root / f"m{key}.pt", root / f"c{key}.pt"
            rc, out, err = run(
                ["train", "--arch", "lenet", "--data", ws["train"], "--classes", classes]
                + ["--epochs", 5, "--seed", seed, "--out", model]
            )
            assert rc == 0, err
            ws[f"train{key}"] = out
            rc, out, err = run(
                ["locate", "--model", model, "--data", ws["train"]]
                + ["--samples-per-class", 15, "--out", comps, "-v"]
            )
            assert rc == 0, err
            ws[f"locate{key}"] = out
            ws[f"m{key}"], ws[f"c{key}"] = model, comps
        torch.set_num_threads(threads)
        yield ws


@pytest.fixture(scope="module")
def plain_cnn(ws):
    """A plain_cnn on digits 3-less (0, 1, 2) with its components: another architecture."""
    model, comps = ws["root"] / "p.pt", ws["root"] / "cp.pt"
    rc, _, err = run(
        ["train", "--arch", "plain_cnn", "--data", ws["train"], "--classes", "0,1,2"]
        + ["--no-accuracy", "--out", model]
    )
    assert rc == 0, err
    rc, _, err = run(
        ["locate", "--model", model, "--data", ws["train"], "--classes", "0,1,2"]
        + ["--samples-per-class", 5, "--out", comps]
    )
    assert rc == 0, err
    return model, comps


def test_train_writes_state_dict_and_sidecar(ws):
    meta = json.loads(ws["m1"].with_suffix(".json").read_text())
    assert meta["arch"] == "lenet" and meta["class_names"] == ["0", "1", "2"]
    assert meta["input_spec"] == MNIST_SPEC.to_dict()
    state = torch.load(ws["m1"], weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values())
    assert "trained lenet on 120 images of 3 classes" in ws["train1"]
    assert "train accuracy" in ws["train1"]
    assert not list(ws["root"].glob(".tmp-*"))  # atomic writes leave no temp file


def test_locate_saves_components_and_prints_table(ws):
    comps = Components.load(ws["c1"])
    assert comps.class_names == ["0", "1", "2"] and comps.located_classes == [0, 1, 2]
    assert comps.dataset["source"] == str(ws["train"].resolve())
    assert all(s.numel() == 15 for s in comps.selected.values())
    out = ws["locate1"]
    assert "located 3 of 3 classes of m1.pt on 240 images" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("class"))
    assert [line.split()[0] for line in lines[header + 2 : header + 5]] == ["0", "1", "2"]
    assert "per layer" in lines[header] and "FLOPs" in lines[header]


def test_flow_disassemble_assemble_evaluate_predict_routes(ws, tmp_path):
    m1, c1, m2, c2 = ws["m1"], ws["c1"], ws["m2"], ws["c2"]

    rc, out, err = run(
        ["disassemble", "--model", m1, "--components", c1, "--classes", "2,0"]
        + ["--out", tmp_path / "comp.pt"]
    )
    assert rc == 0, err
    assert "component" in out and "source" in out and "ratio" in out
    assert load_exported(tmp_path / "comp.pt").class_names == ["2", "0"]

    asm = tmp_path / "asm.pt"
    rc, out, err = run(
        ["assemble", "--part", f"{m1}:{c1}:0,1,2", "--part", f"{m2}:{c2}:7,8,9", "--out", asm]
    )
    assert rc == 0, err
    assert f"form branches, scaling {DEFAULT_SCALING}" in out
    lineage = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [row[1] for row in lineage] == DIGITS
    assert {row[2] for row in lineage} == {"m1.pt", "m2.pt"}
    assert load_exported(asm).class_names == DIGITS

    rc, out, err = run(["evaluate", "--model", asm, "--data", ws["test"], "--json"])
    assert rc == 0, err
    result = json.loads(out)
    assert result["images"] == len(DIGITS) * TEST_PER_CLASS
    assert 100 / len(DIGITS) < result["accuracy"] <= 100
    assert list(result["per_class"]) == DIGITS

    rc, out, err = run(["evaluate", "--source-model", m1, "--data", ws["test"]])
    assert rc == 0, err
    assert out.startswith("m1.pt: accuracy") and "on 60 images" in out
    assert float(out.split("accuracy ")[1].split("%")[0]) > 50

    images = []
    for digit in ("7", "0"):
        data = load_image_folder(ws["test"], MNIST_SPEC, classes=[digit], progress=False)
        path = tmp_path / f"digit{digit}.png"
        Image.fromarray(data.images[0, 0].numpy()).save(path)
        images.append(path)
    rc, out, err = run(["predict", "--model", asm, "--top-k", 2, "--json", *images])
    assert rc == 0, err
    preds = json.loads(out)
    assert [p["image"] for p in preds] == [str(p) for p in images]
    for p in preds:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 2 and probs[0] >= probs[1] and sum(probs) <= 1 + 1e-6
        assert all(t["class"] in DIGITS for t in p["top"])
    rc, out, err = run(["predict", "--source-model", m1, images[1]])
    assert rc == 0, err
    assert out.startswith(f"{images[1]}: ") and out.count("%") == 3

    svg = tmp_path / "routes.svg"
    rc, out, err = run(
        ["routes", "--model", m1, "--components", c1, "--classes", "0,1", "--out", svg]
    )
    assert rc == 0, err
    assert svg.read_text().startswith("<svg") and "classifier.4" in out and "shared" in out


def test_assemble_padded_with_explicit_datasets(ws, tmp_path):
    m1, c1, m2, c2 = ws["m1"], ws["c1"], ws["m2"], ws["c2"]
    out_path = tmp_path / "padded.pt"
    rc, out, err = run(
        ["assemble", "--part", f"{m1}:{c1}:1,0:{ws['train']}", "--part", f"{m2}:{c2}:9"]
        + ["--data-for-part", f"2={ws['train']}", "--scaling", "reference", "--form", "padded"]
        + ["--out", out_path]
    )
    assert rc == 0, err
    assert "form padded, scaling reference" in out
    assert load_exported(out_path).class_names == ["1", "0", "9"]


def test_help_of_every_command_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: lego {command}" in out and "examples:" in out and "lego " in out


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lego: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_files(ws, tmp_path):
    missing = tmp_path / "missing.pt"
    rc, out, err = run(["evaluate", "--model", missing, "--data", ws["test"]])
    assert_one_line_error(rc, err, "not found", "missing.pt")
    assert out == ""
    rc, _, err = run(["evaluate", "--source-model", ws["m1"], "--data", tmp_path / "no.tar.gz"])
    assert_one_line_error(rc, err, "does not exist")
    rc, _, err = run(
        ["routes", "--model", ws["m1"], "--components", missing, "--classes", "0"]
        + ["--out", tmp_path / "r.svg"]
    )
    assert_one_line_error(rc, err, "components file not found")
    rc, _, err = run(["predict", "--source-model", ws["m1"], tmp_path / "nope.png"])
    assert_one_line_error(rc, err, "No such file", "nope.png")


def test_unknown_class(ws, tmp_path):
    rc, _, err = run(
        ["disassemble", "--model", ws["m1"], "--components", ws["c1"], "--classes", "0,seven"]
        + ["--out", tmp_path / "x.pt"]
    )
    assert_one_line_error(rc, err, "unknown class 'seven'")
    rc, _, err = run(
        ["train", "--arch", "lenet", "--data", ws["train"], "--classes", "0,5"]
        + ["--out", tmp_path / "x.pt"]
    )
    assert_one_line_error(rc, err, "unknown class '5'")
    assert not (tmp_path / "x.pt").exists()


def test_corrupt_files(ws, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ws["m1"].read_bytes()[:200])
    bad.with_suffix(".json").write_text(ws["m1"].with_suffix(".json").read_text())
    rc, _, err = run(["locate", "--model", bad, "--data", ws["train"], "--out", tmp_path / "c"])
    assert_one_line_error(rc, err, "bad.pt", "not a PyTorch state_dict file")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all")
    rc, _, err = run(["evaluate", "--model", junk, "--data", ws["test"]])
    assert_one_line_error(rc, err, "junk.pt", "not a readable exported model")

    rc, _, err = run(["evaluate", "--model", ws["m1"], "--data", ws["test"]])
    assert_one_line_error(rc, err, "--source-model")

    rc, _, err = run(
        ["routes", "--model", ws["m1"], "--components", ws["m1"], "--classes", "0"]
        + ["--out", tmp_path / "r.svg"]
    )
    assert_one_line_error(rc, err, "components file")

    bare = tmp_path / "bare.pt"
    bare.write_bytes(ws["m1"].read_bytes())
    rc, _, err = run(
        ["routes", "--model", bare, "--components", ws["c1"], "--classes", "0"]
        + ["--out", tmp_path / "r.svg"]
    )
    assert_one_line_error(rc, err, "no sidecar", "--arch")
    rc, _, err = run(
        ["routes", "--model", bare, "--components", ws["c1"], "--classes", "0"]
        + ["--arch", "lenet", "--class-names", '["0", "1", "2"]', "--spec", "mnist"]
        + ["--out", tmp_path / "r.svg"]
    )
    assert rc == 0, err


def test_incompatible_components(ws, tmp_path, plain_cnn):
    rc, _, err = run(
        ["disassemble", "--model", ws["m1"], "--components", ws["c2"], "--classes", "0"]
        + ["--out", tmp_path / "x.pt"]
    )
    assert_one_line_error(rc, err, "located on a different model")

    model, comps = plain_cnn
    rc, _, err = run(
        ["assemble", "--part", f"{ws['m2']}:{ws['c2']}:7,8", "--part", f"{model}:{comps}:0"]
        + ["--form", "padded", "--scaling", "none", "--out", tmp_path / "x.pt"]
    )
    assert_one_line_error(rc, err, "padded form needs components of one architecture")
    assert not (tmp_path / "x.pt").exists()


def test_assemble_without_locating_dataset(ws, tmp_path):
    comps = Components.load(ws["c1"])
    comps.dataset["source"] = str(tmp_path / "gone.tar.gz")
    moved = tmp_path / "moved.pt"
    comps.save(moved)
    part = f"{ws['m1']}:{moved}:0,1"
    rc, _, err = run(["assemble", "--part", part, "--out", tmp_path / "x.pt"])
    assert_one_line_error(rc, err, "part 1", "gone.tar.gz", "was not found")
    rc, _, err = run(["assemble", "--part", f"{part}:{ws['test']}", "--out", tmp_path / "x.pt"])
    assert_one_line_error(rc, err, "is not the one its components were located on")
    rc, _, err = run(["assemble", "--part", f"{ws['m1']}:{moved}", "--out", tmp_path / "x.pt"])
    assert_one_line_error(rc, err, "MODEL:COMPONENTS:CLASSES")


def test_parsers():
    assert parse_names("0, 1,2") == ["0", "1", "2"]
    assert parse_names('["cat", "dog", 3]') == ["cat", "dog", "3"]
    assert parse_threshold("0.25", "alpha") == 0.25
    assert parse_threshold("conv=0.3,linear=0.4", "alpha") == {"conv": 0.3, "linear": 0.4}
    assert parse_threshold('{"linear": 0.1}', "beta") == {"linear": 0.1}
    assert parse_spec("MNIST") == MNIST_SPEC
    assert parse_spec(json.dumps(MNIST_SPEC.to_dict())) == MNIST_SPEC
    for bad in (lambda: parse_names(" , "), lambda: parse_spec("svhn")):
        with pytest.raises(ValueError):
            bad()


def test_app_cli_gets_the_commands_with_clean_errors(tmp_path, capsys):
    app_cli = pytest.importorskip("app.cli")
    args = app_cli.build_parser().parse_args(
        ["evaluate", "--model", str(tmp_path / "none.pt"), "--data", str(tmp_path)]
    )
    assert args.func(args) == 2  # app.cli calls func directly: it is guarded itself
    assert run_command(args) == 2
    err = capsys.readouterr().err
    assert err.count("lego: error: model file not found") == 2 and "Traceback" not in err


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "lego_core.cli", "predict", "--model", "x.pt", "a.png"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "model file not found: x.pt")
