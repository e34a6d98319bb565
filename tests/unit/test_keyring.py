"""The keys file: tenants' weights beside their keys, and the lines that are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.api.keyring import KeyRing, KeysFileError, parse_keys_file


def keys_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_weight_belongs_to_the_tenant_and_the_rest_weigh_the_default(tmp_path: Path) -> None:
    ring = KeyRing(
        ["env-key-0001"],
        keys_file(
            tmp_path,
            "alpha-key-one team-a weight=3",
            "alpha-key-two team-a weight=3",  # the same tenant may repeat its weight
            "beta-key-0001 team-b",
            "gamma-key-001 team-c weight=0.5",
        ),
    )
    assert ring.weights() == {"t_team-a": 3.0, "t_team-c": 0.5}
    assert ring.tenant_for("alpha-key-two") == "t_team-a"


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("alpha-key-one team-a weight=0", "weight=W"),
        ("alpha-key-one team-a weight=-2", "weight=W"),
        ("alpha-key-one team-a weight=nan", "weight=W"),
        ("alpha-key-one team-a weight=lots", "weight=W"),
        ("alpha-key-one team-a priority=2", "weight=W"),
        ("alpha-key-one team-a weight=2 extra", "[weight=W]"),
    ],
)
def test_a_bad_weight_names_its_line(tmp_path: Path, line: str, says: str) -> None:
    with pytest.raises(KeysFileError, match=r"keys\.txt:2: .*" + says.replace("[", r"\[")):
        parse_keys_file(keys_file(tmp_path, "# keys", line))


def test_one_tenant_given_two_weights_is_refused(tmp_path: Path) -> None:
    path = keys_file(tmp_path, "alpha-key-one team-a weight=2", "alpha-key-two team-a weight=5")
    with pytest.raises(
        KeysFileError, match=r"keys\.txt:2: tenant team-a was given weight 2 on line 1"
    ):
        parse_keys_file(path)


def test_priority_is_allowed_to_flagged_file_tenants_and_to_everyone_else(tmp_path: Path) -> None:
    ring = KeyRing(
        ["env-key-0001"],
        keys_file(
            tmp_path,
            "alpha-key-one team-a priority",
            "alpha-key-two team-a",  # another key of a flagged tenant: the tenant is allowed
            "beta-key-0001 team-b weight=2",
            "gamma-key-001 team-c priority weight=4",
        ),
    )
    assert ring.priority_allowed("t_team-a")
    assert not ring.priority_allowed("t_team-b")
    assert ring.priority_allowed("t_team-c") and ring.weights()["t_team-c"] == 4.0
    assert ring.priority_allowed(ring.tenant_for("env-key-0001") or "")
    assert ring.priority_allowed("public")


def test_admin_is_a_role_of_the_key_not_of_its_tenant(tmp_path: Path) -> None:
    ring = KeyRing(
        ["env-key-0001"],
        keys_file(
            tmp_path,
            "ops-key-00001 ops admin",
            "ops-key-00002 ops",
            "alice-key-001 alice priority admin weight=2",
        ),
    )
    assert ring.is_admin("ops-key-00001")
    assert not ring.is_admin("ops-key-00002")  # the same tenant, no role
    assert ring.is_admin("alice-key-001")  # flags in any order beside the weight
    assert ring.priority_allowed("t_alice")
    assert not ring.is_admin("env-key-0001")  # environment keys carry no role
    assert not ring.is_admin("unknown-key-1")
    assert not ring.is_admin(None)


def test_without_keys_everyone_is_an_admin() -> None:
    assert KeyRing([]).is_admin(None)


def test_an_unknown_flag_is_refused_naming_its_line(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match=":1: expected"):
        parse_keys_file(keys_file(tmp_path, "ops-key-00001 ops root"))
