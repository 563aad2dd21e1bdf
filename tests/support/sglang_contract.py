"""SGLang 0.5.23's JSON contract as the tests hold the client and the test double to it: the request
and reply fixtures read from its source (``tests/fixtures/sglang``) and a shape comparison."""
from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sglang"


def fixture(name: str):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def assert_shape(got, want, where: str = "") -> None:
    """``got`` has every key of ``want`` (recursively) with a value of the same JSON type."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {got!r} is not an object"
        for key, value in want.items():
            assert key in got, f"{where}: no key {key!r} in {sorted(got)}"
            assert_shape(got[key], value, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list), f"{where}: {got!r} is not a list"
        if want and got:
            assert_shape(got[0], want[0], f"{where}[0]")
    elif want is not None and got is not None:
        number = (int, float)
        same = isinstance(got, number) if isinstance(want, number) and not isinstance(want, bool) else \
            type(got) is type(want)
        assert same, f"{where}: {got!r} is not like {want!r}"


