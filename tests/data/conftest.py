"""Session-scoped tiny datasets (generated once, read-only in the tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import fixtures as fx


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="session")
def mpdd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_mvtec(tmp_path_factory.mktemp("mpdd"), ("tubes", "connector"), defect="bad")


@pytest.fixture(scope="session")
def btad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_btad(tmp_path_factory.mktemp("btad"))


@pytest.fixture(scope="session")
def loco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_mvtec_loco(tmp_path_factory.mktemp("loco"))


@pytest.fixture(scope="session")
def visa_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_visa(tmp_path_factory.mktemp("visa"))


@pytest.fixture(scope="session")
def realiad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_realiad(tmp_path_factory.mktemp("realiad"))


@pytest.fixture(scope="session")
def medical_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_anomalyclip_medical(tmp_path_factory.mktemp("colon"))


@pytest.fixture(scope="session")
def dagm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_anomalyclip_dagm(tmp_path_factory.mktemp("dagm"))


@pytest.fixture(scope="session")
def tn3k_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_tn3k(tmp_path_factory.mktemp("tn3k"))


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_folder(tmp_path_factory.mktemp("parts"))
