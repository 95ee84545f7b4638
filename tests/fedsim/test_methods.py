"""The algorithms' names (``fedsim.methods``): every plain name and its GMA twin, the alias, and
the server optimizer a name fixes, against the table of the module's docstring."""
import pytest

from fedsim.methods import (ALGORITHMS, ALIASES, PLAIN, canonical, is_masked, masked_name,
                            plain_name, server_optimizer_of)

#: the server optimizer each plain name fixes, as ``fedsim.algorithms``' table documents it
FIXED = {"fedavgm": "momentum", "fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}


def test_every_plain_name_is_followed_by_its_twin():
    assert ALGORITHMS[0::2] == tuple(PLAIN)
    assert ALGORITHMS[1::2] == tuple("fedgma" if p == "fedavg" else p + "+gma" for p in PLAIN)
    assert len(set(ALGORITHMS)) == len(ALGORITHMS)


@pytest.mark.parametrize("name, plain, masked", [
    ("fedavg", "fedavg", False), ("fedgma", "fedavg", True), ("fedavg+gma", "fedavg", True),
    ("scaffold", "scaffold", False), ("scaffold+gma", "scaffold", True),
    ("fedgma-v1", "fedgma-v1", False), ("fedgma-v1+gma", "fedgma-v1", True),
    ("fedadam+gma", "fedadam", True), ("irm", "irm", False),
])
def test_plain_name_and_is_masked(name, plain, masked):
    assert plain_name(name) == plain
    assert is_masked(name) is masked
    if masked:
        assert canonical(name) == masked_name(plain)  # the listed spelling of the twin


def test_the_alias_is_fedgma():
    assert ALIASES == {"fedavg+gma": "fedgma"}
    assert canonical("fedavg+gma") == "fedgma" and canonical("fedprox") == "fedprox"
    assert masked_name("fedavg") == "fedgma" and masked_name("fedprox") == "fedprox+gma"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_the_server_optimizer_a_name_fixes_is_its_plain_names(name):
    assert server_optimizer_of(name) == FIXED.get(plain_name(name))
