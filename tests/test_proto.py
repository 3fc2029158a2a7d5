"""The generated code in provider/_proto matches proto/service.proto."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], check=True, cwd=ROOT)
    generated = sorted(p.name for p in (tmp_path / "provider" / "_proto").iterdir())
    assert generated == ["service_pb2.py", "service_pb2.pyi", "service_pb2_grpc.py"]
    for name in generated:
        fresh = (tmp_path / "provider" / "_proto" / name).read_text()
        committed = (ROOT / "provider" / "_proto" / name).read_text()
        assert fresh == committed, f"provider/_proto/{name} is stale: run `make proto`"


def test_wire_contract_field_numbers() -> None:
    from provider._proto import service_pb2

    fields = {
        message: {f.name: f.number for f in getattr(service_pb2, message).DESCRIPTOR.fields}
        for message in ("MountRequest", "MountResponse", "File", "ObjectVersion", "VersionResponse")
    }
    assert fields == {
        "MountRequest": {
            "attributes": 1,
            "secrets": 2,
            "target_path": 3,
            "permission": 4,
            "current_object_version": 5,
        },
        "MountResponse": {"object_version": 1, "error": 2, "files": 3},
        "File": {"path": 1, "mode": 2, "contents": 3},
        "ObjectVersion": {"id": 1, "version": 2},
        "VersionResponse": {"version": 1, "runtime_name": 2, "runtime_version": 3},
    }
    assert service_pb2.DESCRIPTOR.package == "v1alpha1"
    assert service_pb2.DESCRIPTOR.services_by_name["CSIDriverProvider"].full_name == "v1alpha1.CSIDriverProvider"
