"""The contribution flow: `kdbench new-method`, the generated methods page, examples in every command's help."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from kdbench.cli import build_parser, main
from kdbench.method import DEFAULT_METHODS_DIR, METHODS
from kdbench.methods_page import render

COMMITTED_PAGE = DEFAULT_METHODS_DIR / "README.md"

TRY_THE_TEMPLATE = """\
import sys
from kdbench.method import METHODS
cls = METHODS.get("my_kd")
print("doc has Deviations:", "Deviations:" in sys.modules[cls.__module__].__doc__)
print("fields:", list(cls.Config.model_fields))
try:
    cls(cls.Config(), {}, {}).loss({}, {}, None, 0.0)
except NotImplementedError as exc:
    print("NotImplementedError:", exc)
"""


def test_new_method_writes_a_registered_unfinished_method(tmp_path, capsys):
    assert main(["new-method", "my_kd", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"KDBENCH_METHODS_PATH={tmp_path}" in out and "pytest tests/test_method_contract.py -k my_kd" in out
    assert "kdbench tune --suite cpu --method my_kd" in out and "kdbench run --suite cpu --method my_kd" in out and "kdbench methods-page" in out
    assert [p.name for p in tmp_path.iterdir()] == ["my_kd.py"]
    assert not (DEFAULT_METHODS_DIR / "my_kd.py").exists()

    env = {**os.environ, "KDBENCH_METHODS_PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", TRY_THE_TEMPLATE], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "doc has Deviations: True" in done.stdout and "fields: ['weight']" in done.stdout
    assert "NotImplementedError: my_kd.loss is not written yet: return a dict of named, already weighted" in done.stdout


def test_an_unfinished_method_stops_a_run_before_anything_trains(tmp_path, tiny_suite):
    """The preflight computes each method's loss once on a dry batch: the template's NotImplementedError is one
    line and exit 2, not a traceback halfway through a suite."""
    assert main(["new-method", "my_kd", "--dir", str(tmp_path)]) == 0
    env = {**os.environ, "KDBENCH_METHODS_PATH": str(tmp_path)}
    args = ["run", "--suite", str(tiny_suite), "--method", "my_kd", "--results-dir", str(tmp_path / "r")]
    done = subprocess.run([sys.executable, "-m", "kdbench", *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("kdbench: error: method my_kd fails on a dry batch of mnist1d cnn1d_w8:cnn1d_w4: "
                          "NotImplementedError: my_kd.loss is not written yet")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "name, message",
    [
        ("my-kd", "method name 'my-kd': use a Python identifier"),
        ("class", "method name 'class': use a Python identifier that is not a keyword"),
        ("_hidden", "does not start with '_'"),
        ("taken", "taken.py already exists"),
        ("vanilla_kd", "method 'vanilla_kd' is already registered (in "),
    ],
)
def test_new_method_refuses_bad_names_in_one_line(tmp_path, capsys, name, message):
    (tmp_path / "taken.py").write_text("# someone's work\n")
    assert main(["new-method", name, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["taken.py"]
    assert (tmp_path / "taken.py").read_text() == "# someone's work\n"


def test_committed_methods_page_is_up_to_date(capsys):
    assert main(["methods-page", "--check"]) == 0, "run `kdbench methods-page` and commit methods/README.md"


def test_stale_methods_page_fails_the_check(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text(COMMITTED_PAGE.read_text().replace("## vanilla_kd", "## vanilla_kd (old)"))
    assert main(["methods-page", "--check", "--output", str(stale)]) == 1
    assert "is stale; run `kdbench methods-page`" in capsys.readouterr().out
    assert "## vanilla_kd (old)" in stale.read_text()  # --check writes nothing
    assert main(["methods-page", "--output", str(stale)]) == 0
    assert main(["methods-page", "--check", "--output", str(stale)]) == 0


def test_methods_page_has_every_method_docstring_and_field():
    page = render()
    for name in METHODS.names():
        cls = METHODS.get(name)
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        if cls.variant_of:  # a variant points to its method's section, which has the docstring
            assert f"[`{cls.variant_of}`](#{cls.variant_of})" in section
        else:
            assert "Deviations:" in section
        for field, info in cls.Config.model_fields.items():
            description = (info.description or "–").replace("|", "\\|").replace("<", "\\<")
            assert f"| `{field}` |" in section and description in section


def test_list_methods_is_one_line_per_method(capsys):
    assert main(["list", "methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in METHODS.names():
        cls = METHODS.get(name)
        (line,) = [line for line in lines if line.split()[0] == name]
        teacher = "yes" if cls.needs_teacher else "no"
        assert line.split()[1:3] == [str(cls.version), teacher] and "logits" in line
        assert line.rstrip().endswith(cls.__doc__.strip().splitlines()[0])


def test_every_command_has_examples_in_its_help():
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"new-method", "methods-page", "run", "list"} <= set(commands.choices)
    for name, parser in commands.choices.items():
        examples = parser.format_help().split("examples:\n", 1)
        assert len(examples) == 2, f"`kdbench {name} --help` has no examples"
        commands_shown = [line for line in examples[1].splitlines() if "kdbench " in line]
        assert len(commands_shown) >= 2, f"`kdbench {name} --help` shows fewer than 2 examples"


def test_the_top_level_help_lists_every_command(capsys):
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    shown = capsys.readouterr().out
    assert exit_.value.code == 0
    assert all(name in shown for name in commands.choices)
    assert "Δ with its 95 % interval" in shown  # a help text's % is printed, not taken for a format
