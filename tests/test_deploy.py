"""What a deploy uploads and deploys: the package only, every target, Python 3.12."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import main

pytestmark = pytest.mark.no_backend

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [
    "exchange_auth_code",
    "refresh_auth_token",
    "lookup_user",
    "revoke_sessions",
    "delete_user",
]


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="needs the gcloud CLI")
def test_deploy_uploads_only_main_requirements_and_the_package():
    listing = subprocess.run(
        ["gcloud", "meta", "list-files-for-upload", str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()

    uploaded = {Path(p).as_posix() for p in listing}
    package = {f"auth/{p.name}" for p in (ROOT / "auth").glob("*.py")}
    assert uploaded == {"main.py", "requirements.txt"} | package


def test_deploy_cloudbuild_deploys_every_target_on_python312():
    steps = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())["steps"]
    deploy = next(s for s in steps if s["id"] == "deploy")
    script = deploy["args"][-1]

    assert deploy["waitFor"] == ["test"]
    assert "--gen2" in script and "--runtime=python312" in script
    assert "--trigger-http" in script and '--entry-point="$$fn"' in script
    for target in TARGETS:
        assert target in script
        assert callable(getattr(main, target))


def test_deploy_requirements_are_pinned():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    packages = [line for line in lines if line and not line.startswith("#")]

    assert packages and all("==" in line for line in packages)
