"""The public surface of ``import qbitmap``: exactly the documented names, typed and documented,
loaded lazily so that the import itself stays cheap.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

import qbitmap

ROOT = Path(__file__).resolve().parents[2]
API_DOC = ROOT / "docs" / "api.md"
HEAVY = ("click", "rich", "numpy", "construct")


def documented_names() -> list[str]:
    """The names docs/api.md documents: one ``### `name ...``` heading each."""
    return re.findall(r"^### `(?:class |exception )?(\w+)", API_DOC.read_text(), re.MULTILINE)


def public_objects() -> dict[str, object]:
    return {name: getattr(qbitmap, name) for name in qbitmap.__all__}


def test_all_is_exactly_the_documented_set():
    names = documented_names()
    assert len(names) == len(set(names)), "a name is documented twice"
    assert sorted(qbitmap.__all__) == sorted(names)
    assert len(qbitmap.__all__) == len(set(qbitmap.__all__))


def test_every_name_resolves_and_is_listed_by_dir():
    for name in qbitmap.__all__:
        assert getattr(qbitmap, name) is not None
    assert set(qbitmap.__all__) <= set(dir(qbitmap))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = qbitmap.no_such_name


def _own_doc(obj: object, name: str) -> str:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    # dataclasses write "Name(field, ...)" as the docstring of a class that has none.
    assert doc and doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring"
    return doc


def _members(cls: type) -> dict[str, object]:
    """Public methods and properties a class defines itself (not inherited from object)."""
    out = {}
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__enter__", "__exit__"):
            continue
        if isinstance(value, (types.FunctionType, property, classmethod, staticmethod)):
            out[name] = value
    return out


def test_every_public_name_and_member_has_a_docstring():
    for name, obj in public_objects().items():
        _own_doc(obj, name)
        if isinstance(obj, type) and obj.__module__ == "qbitmap.api":
            for member, value in _members(obj).items():
                if member in ("__enter__", "__exit__"):
                    continue
                target = value.fget if isinstance(value, property) else value
                _own_doc(target, f"{name}.{member}")


def _hints(func: object) -> dict[str, object]:
    target = func.fget if isinstance(func, property) else func
    return typing.get_type_hints(target)


def test_the_public_surface_is_typed():
    for name, obj in public_objects().items():
        if isinstance(obj, types.FunctionType):
            hints = _hints(obj)
            params = inspect.signature(obj).parameters
            assert set(params) | {"return"} == set(hints), name
        elif isinstance(obj, type) and obj.__module__ == "qbitmap.api":
            if dataclasses.is_dataclass(obj):
                fields = {f.name for f in dataclasses.fields(obj)}
                assert fields <= set(typing.get_type_hints(obj)), name
            else:
                assert set(typing.get_type_hints(obj)) >= {
                    "filename",
                    "virtual_size",
                    "cluster_size",
                }
            for member, value in _members(obj).items():
                hints = _hints(value)
                assert "return" in hints, f"{name}.{member}"
                if isinstance(value, types.FunctionType):
                    params = [p for p in inspect.signature(value).parameters if p != "self"]
                    assert set(params) <= set(hints), f"{name}.{member}"


def test_the_package_ships_its_type_information():
    assert (ROOT / "qbitmap" / "py.typed").exists()


def _in_fresh_interpreter(code: str, cwd: Path | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=cwd,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOADED = """
import json, sys
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(%r))
                 + sorted(m for m in sys.modules if m.startswith('qbitmap.'))))
"""


def test_importing_qbitmap_loads_nothing_heavy():
    loaded = _in_fresh_interpreter("import qbitmap, qbitmap.errors\n" + LOADED % (HEAVY,))
    assert loaded == ["qbitmap.errors"]


def test_the_exceptions_load_nothing_heavy():
    code = "import qbitmap\nqbitmap.UsageError, qbitmap.ExitCode\n" + LOADED % (HEAVY,)
    assert _in_fresh_interpreter(code) == ["qbitmap.errors"]


def test_using_the_api_loads_neither_click_nor_rich(tmp_path):
    """Every call, failures included, stays below the command line and its renderers."""
    import qemu

    qemu.require_tools("qemu-img", "qemu-io")
    image = qemu.create_image(tmp_path / "disk.qcow2", 16 << 20)
    qemu.add_bitmap(image, "b0")
    qemu.qemu_io_write(image, [(0, 65536)])
    (tmp_path / "vm.xml").write_text(
        "<domain><name>vm</name><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{image}'/><target dev='vda'/>"
        "</disk></devices></domain>"
    )
    code = """
import qbitmap
with qbitmap.open_image("disk.qcow2") as image:
    image.bitmaps, list(image.extents("b0")), image.read(0, 512), image.writer_running()
qbitmap.check("disk.qcow2").to_dict()
qbitmap.check("missing.qcow2")
qbitmap.recover("disk.qcow2", mode="full", dry_run=True).to_dict()
qbitmap.checkpoints(domain_xml="vm.xml", checkpoint_dir="cps").to_dict()
try:
    qbitmap.recover("disk.qcow2", mode="reference")
except qbitmap.UsageError:
    pass
"""
    loaded = _in_fresh_interpreter(code + LOADED % (("click", "rich"),), cwd=tmp_path)
    assert not [m for m in loaded if not m.startswith("qbitmap.")]
    assert not [m for m in loaded if m.startswith(("qbitmap.cli", "qbitmap.commands"))]
    assert "qbitmap.ui" not in loaded


def test_check_and_recover_stay_functions_when_their_subpackages_load():
    """qbitmap/check/ and qbitmap/recover/ are packages too: loading them hides nothing."""
    code = """
import json, qbitmap
import qbitmap.libvirt  # loads qbitmap.check and qbitmap.check.chain
from qbitmap.recover import engine  # loads qbitmap.recover
from qbitmap.check import findings
import sys
print(json.dumps([
    callable(qbitmap.check), qbitmap.check.__module__, callable(qbitmap.recover),
    qbitmap.recover.__module__, sys.modules["qbitmap.check"].__name__,
    findings.__name__, engine.__name__,
]))
"""
    assert _in_fresh_interpreter(code) == [
        True,
        "qbitmap.api",
        True,
        "qbitmap.api",
        "qbitmap.check",
        "qbitmap.check.findings",
        "qbitmap.recover.engine",
    ]


def test_every_api_name_that_is_also_a_submodule_is_guarded():
    """Any name of __all__ that a module of the package also has keeps pointing at the API."""
    package = ROOT / "qbitmap"
    clashing = [
        name
        for name in qbitmap.__all__
        if (package / name).is_dir() or (package / f"{name}.py").exists()
    ]
    assert clashing == ["check", "recover"]
    for name in clashing:
        __import__(f"qbitmap.{name}")
        assert isinstance(getattr(qbitmap, name), types.FunctionType), name


def test_no_module_reaches_a_shadowed_subpackage_through_the_package_attribute():
    """``import qbitmap.check.x`` binds ``qbitmap`` and reads ``qbitmap.check``: the function.

    Code reaches those subpackages with ``from qbitmap.check import ...`` instead.
    """
    import ast

    offenders = []
    for path in [*(ROOT / "qbitmap").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if re.match(r"qbitmap\.(check|recover)(\.|$)", alias.name):
                        offenders.append(f"{path.relative_to(ROOT)}: import {alias.name}")
    assert not offenders, "\n".join(offenders)
