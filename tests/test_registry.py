import pytest

from kdbench.errors import KdbenchError
from kdbench.method import METHODS, _load_method_file
from kdbench.models import MODELS
from kdbench.registry import Registry
from kdbench.tracks import TRACKS


def test_register_and_get():
    reg = Registry("thing")
    reg.register("alpha")(1)
    assert reg.get("alpha") == 1
    assert reg.names() == ["alpha"]


def test_unknown_name_suggests_closest():
    with pytest.raises(KdbenchError) as err:
        METHODS.get("vanila_kd")
    assert "did you mean: vanilla_kd" in str(err.value)
    assert "\n" not in str(err.value)


def test_duplicate_name_raises():
    reg = Registry("thing")
    reg.register("alpha")(1)
    with pytest.raises(KdbenchError, match="registered twice"):
        reg.register("alpha")(2)


def test_discovery_finds_method_files():
    assert {"baseline", "vanilla_kd"} <= set(METHODS.names())
    assert "mnist1d" in TRACKS
    assert "cnn1d_w8" in MODELS


def test_broken_method_file_fails_loudly(tmp_path):
    path = tmp_path / "broken_method.py"
    path.write_text("import not_a_module_anywhere\n")
    with pytest.raises(KdbenchError, match="broken_method.py failed to import: ModuleNotFoundError"):
        _load_method_file(path)


def test_method_name_must_match_file_name(tmp_path):
    path = tmp_path / "some_file.py"
    path.write_text(
        "from kdbench.method import SupervisedOnly, register_method\n"
        "@register_method('other_name')\nclass M(SupervisedOnly):\n    '''x'''\n"
    )
    with pytest.raises(KdbenchError, match="must be named other_name.py"):
        _load_method_file(path)


@pytest.mark.parametrize("body, message", [
    ("class M:\n    '''x'''\n", "which is not a subclass of kdbench.method.Method"),
    ("class M(Method):\n    '''x'''\n    Config = dict\n    def loss(self, s, t, y, p):\n        return {}\n",
     "its Config must subclass kdbench.method.MethodConfig"),
    ("class M(Method):\n    '''x'''\n", "defines no loss(student, teacher, target, progress)"),
])
def test_registry_refuses_what_is_not_a_method(body, message):
    from kdbench.method import Method, register_method

    with pytest.raises(KdbenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        exec("@register_method('not_a_method')\n" + body, {"Method": Method, "register_method": register_method})
