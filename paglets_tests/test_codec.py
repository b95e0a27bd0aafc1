"""Section 5, the wire codec: what state can carry, what it refuses, and what it refuses to read.

The classes below live at module level on purpose: the codec names classes ``module:qualname``,
and this module is already imported when the tests run, so its dataclasses may be named.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import importlib
import json
import math
import socket
import sys
import threading
import tracemalloc
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import paglets
from paglets import ForbiddenError, PagletError, PagletState, SerializationError, from_cbor, to_cbor

#: No example database and no "explain" phase: nothing is written under the repository.
PHASES = [Phase.explicit, Phase.generate, Phase.shrink]
SETTINGS = settings(max_examples=200, deadline=None, database=None, phases=PHASES, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, database=None, phases=PHASES, derandomize=True)  # stable across runs


# -- state classes the codec may name -------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(enum.StrEnum):
    FAST = "fast"
    SAFE = "safe"


class Perm(enum.Flag):
    READ = 1
    WRITE = 2


@dataclass(frozen=True)
class Point:
    """Hashable, so it can be a dict key or a set member."""

    x: int
    label: str = ""


@dataclass
class Leaf:
    name: str
    payload: Any = None


@dataclass
class Node(PagletState):
    value: Any = None
    children: list[Node] = field(default_factory=list)
    meta: dict[Any, Any] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()


@dataclass(slots=True)
class SlotState(PagletState):
    count: int = 0
    items: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class FrozenState:
    when: datetime.datetime
    where: Path


@dataclass
class Evolving(PagletState):
    """Stands for a state class whose code gained and lost fields since the state was stored."""

    kept: int = 0
    added_later: list[str] = field(default_factory=lambda: ["default"])


@dataclass
class Marker(PagletState):
    """A registered state class whose constructor takes one positional value."""

    value: Any = None


@dataclass
class Holder:
    inner: Any = None
    more: dict[Any, Any] = field(default_factory=dict)


class NotAData:
    """A class that is neither a dataclass nor an enum nor a Paglet."""


class Tiny(paglets.Paglet[Marker]):
    State = Marker


def _local_dataclass_instance() -> Any:
    @dataclass
    class Local:
        x: int = 1

    return Local()


# -- comparing values exactly (types matter, nan equals nan) ---------------------------------------


def same(a: Any, b: Any) -> bool:
    """Structural equality that also checks exact types, float signs and nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if {(type(k), k) for k in a} != {(type(k), k) for k in b}:
            return False
        return all(same(a[k], b[k]) for k in a)
    if isinstance(a, (set, frozenset)):
        return {(type(x), x) for x in a} == {(type(x), x) for x in b}
    if isinstance(a, datetime.datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    if isinstance(a, datetime.time):
        return a == b and a.utcoffset() == b.utcoffset()
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return bool(a == b)


def cbor_round_trip(value: Any) -> Any:
    return from_cbor(to_cbor(value))


def json_round_trip(value: Any) -> Any:
    tree = paglets._wire_encode(value)
    return paglets._wire_decode(paglets._json_loads(paglets._json_dumps(tree)), paglets._wire_resolver(()))


# -- strategies ------------------------------------------------------------------------------------

offsets = st.timedeltas(min_value=datetime.timedelta(hours=-23, minutes=-59), max_value=datetime.timedelta(hours=23, minutes=59))
timezones = st.none() | st.just(datetime.UTC) | offsets.map(datetime.timezone)
big_ints = st.integers(min_value=-(2**300), max_value=2**300) | st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, -(2**64), -(2**64) - 1]
)

hashable_scalars = (
    st.none()
    | st.booleans()
    | big_ints
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.text(max_size=6).map(lambda s: "$" + s)
    | st.binary(max_size=8)
    | st.dates()
    | st.datetimes(timezones=timezones)
    | st.times()
    | st.timedeltas()
    | st.decimals(allow_nan=False, places=4)
    | st.uuids()
    | st.text(max_size=10).map(Path)
    | st.sampled_from(list(Color) + list(Level) + list(Mode) + [Perm.READ, Perm.READ | Perm.WRITE])
    | st.builds(Point, st.integers(), st.text(max_size=5))
)
hashables = st.recursive(
    hashable_scalars,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
scalars = (
    hashable_scalars
    | st.floats()  # nan and infinities too
    | st.decimals(allow_nan=True)
    | st.binary(max_size=16).map(bytearray)
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=4)  # non-str keys and "$" keys
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.builds(Leaf, st.text(max_size=6), inner)
        | st.builds(Holder, inner, st.dictionaries(hashables, inner, max_size=2))
    )


values = st.recursive(scalars, _containers, max_leaves=8)
nodes = st.recursive(
    st.builds(Node, values, st.just([]), st.dictionaries(hashables, values, max_size=2), st.frozensets(st.text(max_size=4), max_size=3)),
    lambda kids: st.builds(Node, values, st.lists(kids, max_size=2), st.dictionaries(hashables, values, max_size=2)),
    max_leaves=3,
)


# -- round trips -----------------------------------------------------------------------------------


@SETTINGS
@given(nodes)
def test_nested_dataclass_state_round_trips_through_cbor_and_json(state: Node) -> None:
    for back in (cbor_round_trip(state), json_round_trip(state)):
        assert type(back) is Node
        assert same(state, back), f"{state!r}\n!=\n{back!r}"


@SETTINGS
@given(values)
def test_any_carried_value_round_trips_through_both_paths(value: Any) -> None:
    assert same(value, cbor_round_trip(value))
    assert same(value, json_round_trip(value))


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        -0.0,
        2**64 - 1,
        2**64,
        -(2**64),
        -(2**64) - 1,
        10**300,
        -(10**4000),
        b"\x00\xff",
        bytearray(b"ab"),
        Path("/tmp/x y"),
        datetime.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
        datetime.date(1, 1, 1),
        datetime.time(12, 0, tzinfo=datetime.UTC),
        datetime.timedelta(days=-3, microseconds=7),
        decimal.Decimal("-0.00"),
        decimal.Decimal("sNaN"),
        uuid.UUID(int=2**128 - 1),
        1 + 2j,
        {"$dc": "os:system", "$f": {}},  # a user dict that looks like a marker is data, not a class name
        {"$enum": 1, "plain": 2},
        {"$bytes": "AAAA"},
        {1: "int", 1.5: "float", None: "none", (1, 2): "tuple", frozenset({3}): "frozenset", Color.RED: "enum", Point(1): "dc"},
        {True: "bool key"},
        [set(), frozenset(), (), [], {}],
        Perm.READ | Perm.WRITE,
        Level.HIGH,
        Mode.SAFE,
    ],
    ids=lambda v: repr(v)[:40],
)
def test_special_values_round_trip(value: Any) -> None:
    assert same(value, cbor_round_trip(value))
    assert same(value, json_round_trip(value))


def test_slots_and_frozen_dataclasses_come_back_as_the_current_class() -> None:
    state = SlotState(3, [FrozenState(datetime.datetime(2020, 1, 2, 3, 4, 5), Path("a/b"))])
    back = cbor_round_trip(state)
    assert type(back) is SlotState  # not the pre-slots class that __init_subclass__ saw
    assert back == state
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.items[0].when = None


def test_a_stored_state_survives_fields_added_and_removed_in_the_code() -> None:
    tree = paglets._wire_encode(Evolving(kept=7))
    del tree["$f"]["added_later"]  # stored before the field existed
    tree["$f"]["removed_since"] = [1, 2]  # stored by a version that had another field
    back = paglets._wire_decode(paglets._cbor_loads(paglets._cbor_dumps(tree), untrusted=True), paglets._wire_resolver(()))
    assert back == Evolving(kept=7, added_later=["default"])


def test_a_missing_field_without_default_is_a_serialization_error() -> None:
    tree = paglets._wire_encode(Leaf("x"))
    del tree["$f"]["name"]
    with pytest.raises(SerializationError, match="name"):
        paglets._wire_decode(tree, paglets._wire_resolver(()))


def test_cbor_output_has_no_tags_and_passes_the_network_check() -> None:
    value = Node(value=[datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC), decimal.Decimal("1.5"), 2**100, {1, 2}, uuid.uuid4()])
    data = to_cbor(value)
    paglets._cbor_check(data)  # raises on any tag
    # Decoding with plain cbor2 gives only plain types: no tag hook ever runs.
    plain = cbor2.loads(data)
    stack = [plain]
    while stack:
        item = stack.pop()
        assert type(item) in (dict, list, str, int, float, bool, bytes, type(None))
        stack.extend(item.values() if isinstance(item, dict) else item if isinstance(item, list) else [])


# -- nesting: what the encoder accepts, the decoder must accept ------------------------------------

_NESTERS = {
    "list": lambda v: [v],
    "dict": lambda v: {"k": v},
    "tuple": lambda v: (v,),
    "frozenset": lambda v: frozenset([v]),
    "dollar-key dict": lambda v: {"$k": v},
    "dataclass": lambda v: Leaf("n", v),
}


@pytest.mark.parametrize("depth", [10, 30, 33, 64, 65, 200])
@pytest.mark.parametrize("how", list(_NESTERS))
def test_what_to_cbor_produces_from_cbor_reads(how: str, depth: int) -> None:
    """Deep values are refused with a SerializationError when encoding, or they round-trip."""
    value: Any = 0
    for _ in range(depth):
        value = _NESTERS[how](value)
    try:
        data = to_cbor(value)
    except SerializationError as exc:
        assert "nested deeper" in str(exc)
        return
    assert from_cbor(data) == value


def test_a_self_referencing_value_is_refused_not_a_recursion_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="nested deeper"):
        to_cbor(Holder(inner=loop))


@pytest.mark.parametrize(
    "value", [10**4200, -(10**4200), 10**5000, -(10**5000), 2**20000], ids=["10**4200", "-10**4200", "10**5000", "-10**5000", "2**20000"]
)
def test_huge_ints_either_round_trip_or_are_refused_cleanly(value: int) -> None:
    try:
        data = to_cbor(Holder(inner=value))
    except SerializationError as exc:
        assert "value.inner" in str(exc)
        return
    assert from_cbor(data).inner == value


# -- what the codec cannot carry -------------------------------------------------------------------


def _uncarriable() -> list[tuple[str, Any]]:
    return [
        ("a socket", socket.socket()),
        ("a lambda", lambda: 1),
        ("a function", _local_dataclass_instance),
        ("a lock", threading.Lock()),
        ("a thread", threading.Thread(target=print)),
        ("a local dataclass", _local_dataclass_instance()),
        ("a class", Node),
        ("a module", sys),
        ("a generator", (x for x in ())),
    ]


@pytest.mark.parametrize("what", [name for name, _ in _uncarriable()])
def test_serialization_error_names_the_field_path(what: str) -> None:
    bad = dict(_uncarriable())[what]
    try:
        cases = [
            (Node(value=bad), "value.value"),
            (Node(children=[Node(), Node(meta={"handle": bad})]), "value.children[1].meta.handle"),
            (Node(value=[1, (2, bad)]), "value.value[1][1]"),
            (Holder(inner=Leaf("x", payload=bad)), "value.inner.payload"),
            (Holder(more={7: bad}), "value.more[7]"),
            (Holder(inner={"a", bad} if _hashable(bad) else [bad]), "value.inner["),
        ]
        for value, path in cases:
            with pytest.raises(SerializationError) as info:
                to_cbor(value)
            assert path in str(info.value), str(info.value)
    finally:
        if isinstance(bad, socket.socket):
            bad.close()


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def test_message_args_that_cannot_travel_name_the_argument() -> None:
    lock = threading.Lock()
    with pytest.raises(SerializationError, match=r"args\.lock"):
        paglets.Message("k", {"lock": lock}).to_wire()


# -- hostile CBOR ----------------------------------------------------------------------------------


def _head(major: int, arg: int) -> bytes:
    """A CBOR item head with an 8-byte argument (so any length can be declared)."""
    return bytes([major << 5 | 27]) + arg.to_bytes(8, "big")


_TAG_NUMBERS = [0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 36, 37, 256, 258, 260, 261, 55799, 2**32, 2**64 - 1]

HOSTILE: dict[str, bytes] = {
    **{f"tag {n}": cbor2.dumps(cbor2.CBORTag(n, "2013-03-21T20:04:00Z")) for n in _TAG_NUMBERS},
    "tag 2 bignum": bytes.fromhex("c249010000000000000000"),
    "tag 28/29 shared refs": bytes.fromhex("d81c81d81d00"),
    "tag 0 inside a map": cbor2.dumps({"a": [1, cbor2.CBORTag(0, "2013-03-21T20:04:00Z")]}),
    "tag 258 set": bytes.fromhex("d9010283010203"),
    "tag 55799 self-describe": bytes.fromhex("d9d9f7a0"),
    "tag 35 regex": cbor2.dumps(cbor2.CBORTag(35, "(a+)+$")),
    "indefinite array": bytes.fromhex("9f0102ff"),
    "indefinite map": bytes.fromhex("bf616101ff"),
    "indefinite bytes": bytes.fromhex("5f4101ff"),
    "indefinite text": bytes.fromhex("7f6161ff"),
    "lone break": bytes.fromhex("ff"),
    "reserved additional info 28": bytes.fromhex("1c"),
    "reserved additional info 30": bytes.fromhex("3e"),
    "undefined": bytes.fromhex("f7"),
    "undefined in a list": bytes.fromhex("8201f7"),
    "simple value 0": bytes.fromhex("e0"),
    "simple value 19": bytes.fromhex("f3"),
    "one-byte simple value": bytes.fromhex("f820"),
    "one-byte simple true in disguise": bytes.fromhex("f815"),
    "reserved simple 28": bytes.fromhex("fc"),
    "arrays nested 65 deep": b"\x81" * 65 + b"\x00",
    "maps nested 65 deep": b"\xa1\x61k" * 65 + b"\x00",
    "arrays nested 100000 deep": b"\x81" * 100_000 + b"\x00",
    "bytes longer than the data": _head(2, 2**64 - 1) + b"ab",
    "text longer than the data": _head(3, 2**40) + b"ab",
    "array longer than the data": _head(4, 2**64 - 1) + b"\x00\x00",
    "map longer than the data": _head(5, 2**62) + b"\x00\x00",
    "array of 2**31 items": bytes.fromhex("9a7fffffff") + b"\x00" * 8,
    "map with a missing value": bytes.fromhex("a26161016162"),
    "truncated uint16": bytes.fromhex("1901"),
    "truncated uint64": bytes.fromhex("1b0000"),
    "truncated float64": bytes.fromhex("fb3ff0"),
    "truncated text": bytes.fromhex("6461"),
    "empty": b"",
    "trailing byte": cbor2.dumps([1, 2]) + b"\x00",
    "two values": cbor2.dumps({"a": 1}) + cbor2.dumps({"a": 1}),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_cbor_check_refuses_hostile_input(name: str) -> None:
    data = HOSTILE[name]
    tracemalloc.start()
    try:
        with pytest.raises(SerializationError):
            paglets._cbor_check(data)
        with pytest.raises(SerializationError):
            from_cbor(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(data) + 1_000_000, f"{peak} bytes allocated"


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("f4"),
        bytes.fromhex("f5"),
        bytes.fromhex("f6"),
        bytes.fromhex("f93c00"),
        bytes.fromhex("fa3f800000"),
        bytes.fromhex("1bffffffffffffffff"),
        bytes.fromhex("3bffffffffffffffff"),
        b"\x81" * 64 + b"\x00",
        cbor2.dumps({"a": [1, 2.5, "x", b"y", None, True, {"b": []}]}),
    ],
    ids=lambda b: b.hex()[:24],
)
def test_cbor_check_accepts_plain_items(data: bytes) -> None:
    paglets._cbor_check(data)
    assert from_cbor(data) == cbor2.loads(data)


def test_every_prefix_of_a_valid_encoding_is_refused() -> None:
    data = to_cbor(Node(value=[1.5, "text", b"bytes", 2**70, {3: 4}], children=[Node(meta={"k": "v"})]))
    for cut in range(len(data)):
        with pytest.raises(SerializationError):
            from_cbor(data[:cut])


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("62fffe"),  # invalid UTF-8
        cbor2.dumps({1: 2}),  # wire maps have string keys
        cbor2.dumps({b"k": 1}),
        bytes.fromhex("a1810000"),  # an array as a key
        cbor2.dumps({"$nosuchmarker": 1}),
        cbor2.dumps({"$tuple": 5}),
        cbor2.dumps({"$set": [[1]]}),  # unhashable member
        cbor2.dumps({"$map": [[[1], 2]]}),  # unhashable key
        cbor2.dumps({"$map": [[1]]}),
        cbor2.dumps({"$int": "1" * 5000}),
        cbor2.dumps({"$int": "nope"}),
        cbor2.dumps({"$datetime": "yesterday"}),
        cbor2.dumps({"$timedelta": [10**20, 0, 0]}),
        cbor2.dumps({"$uuid": "zz"}),
        cbor2.dumps({"$enum": "paglets:ServiceScope", "$v": "galaxy"}),
        cbor2.dumps({"$dc": 5, "$f": {}}),
        cbor2.dumps({"$dc": "paglets_tests.test_codec:Leaf", "$f": []}),
        cbor2.dumps({"$decimal": "not a number"}),
        cbor2.dumps({"$decimal": "1.2.3"}),
    ],
    ids=lambda b: b.hex()[:40],
)
def test_well_formed_cbor_that_is_not_a_wire_value_is_a_serialization_error(data: bytes) -> None:
    with pytest.raises(SerializationError):
        from_cbor(data)


@pytest.mark.parametrize("size", [2**62, 50_000_000])
def test_a_tiny_message_cannot_make_the_decoder_allocate_a_huge_buffer(size: int) -> None:
    data = cbor2.dumps({"$bytearray": size})
    tracemalloc.start()
    try:
        with pytest.raises(SerializationError):
            from_cbor(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes allocated for a {len(data)}-byte message"


def _must_be_a_clean_refusal(data: bytes) -> None:
    try:
        from_cbor(data)
    except PagletError as exc:
        # A class name that is not allowed is a 403; everything else is a 400.
        assert isinstance(exc, (SerializationError, ForbiddenError)), repr(exc)


@FUZZ
@given(st.binary(max_size=80))
def test_random_bytes_only_ever_raise_serialization_error(data: bytes) -> None:
    _must_be_a_clean_refusal(data)


_RICH = to_cbor(
    Node(
        value=[(1, 2), {3, 4}, frozenset({"a"}), {"$x": 1, 2: 3}, Color.RED, Level.LOW, b"b", bytearray(b"c"), Path("/p")],
        meta={"when": datetime.datetime(2020, 1, 1), "d": datetime.date(2020, 1, 1), "t": datetime.time(1), "td": datetime.timedelta(1)},
        children=[Node(value=[decimal.Decimal("1.5"), uuid.UUID(int=5), 2**80, -(2**80), 1j, None, True, 1.5])],
    )
)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_RICH) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_valid_encodings_only_ever_raise_serialization_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_RICH)
    for pos, byte in edits:
        data[pos] = byte
    _must_be_a_clean_refusal(bytes(data))


# -- the class-name policy (SPEC section 6) --------------------------------------------------------


@pytest.fixture
def module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Write importable modules that leave a marker file behind if they are ever imported."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(name: str | None = None, package: bool = False) -> tuple[str, Path]:
        name = name or f"paglets_probe_{uuid.uuid4().hex[:12]}"
        marker = tmp_path / f"{name}.imported"
        source = (
            "import dataclasses, pathlib\n"
            f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
            "@dataclasses.dataclass\n"
            "class Thing:\n"
            "    x: int = 0\n"
            "class Plain:\n"
            "    pass\n"
        )
        parts = name.split(".")
        folder = tmp_path.joinpath(*parts[:-1])
        for i in range(1, len(parts)):
            package_dir = tmp_path.joinpath(*parts[:i])
            package_dir.mkdir(exist_ok=True)
            (package_dir / "__init__.py").touch()
        (folder / f"{parts[-1]}.py").write_text(source)
        importlib.invalidate_caches()
        made.append(name)
        return name, marker

    yield make
    for name in made:
        for key in [k for k in sys.modules if k == name or k.startswith(name.split(".")[0])]:
            sys.modules.pop(key, None)


POLICY_REFUSED = [
    "os:system",
    "os:popen",
    "builtins:eval",
    "builtins:exec",
    "builtins:open",
    "subprocess:Popen",
    "subprocess:run",
    "posix:system",
    "paglets:_resolve_class",
    "paglets:Path",  # an alias: pathlib.Path seen through paglets' namespace
    "threading:Thread",
    "paglets_tests.test_codec:NotAData",
    "paglets_tests.test_codec:Tiny",  # a Paglet subclass is not state
]


@pytest.mark.parametrize("name", POLICY_REFUSED)
@pytest.mark.parametrize("kind", ["state", "enum", "paglet"])
def test_names_that_are_not_data_classes_are_refused(name: str, kind: str) -> None:
    if kind == "paglet" and name.endswith(":Tiny"):
        return  # Tiny is the one Paglet subclass here; it resolves as a paglet (tested below)
    with pytest.raises(PagletError) as info:
        paglets._resolve_class(name, kind, ())
    assert isinstance(info.value, (SerializationError, ForbiddenError))
    assert 400 <= info.value.http_status < 500


@pytest.mark.parametrize(
    "name",
    [
        "builtins:__import__",
        "os:__builtins__",
        "paglets:Paglet.__init__",
        "paglets:Message.__class__",
        "paglets:Message.__subclasses__",
        "__main__:Thing",
        "paglets_tests.test_codec:Node.__mro__",
    ],
)
def test_names_with_dunders_are_refused(name: str) -> None:
    for kind in ("state", "enum", "paglet"):
        with pytest.raises(ForbiddenError):
            paglets._resolve_class(name, kind, ("*",))


@pytest.mark.parametrize(
    "name",
    [
        "",
        "os",
        "os:",
        ":system",
        "a:b:c",
        "os system",
        "os:sys tem",
        "os.:X",
        ".os:X",
        "os:X.",
        "../x:Y",
        "x/y:Z",
        "a" * 300 + ":X",
        5,
        None,
        b"os:system",
    ],
    ids=repr,
)
def test_malformed_names_are_refused(name: Any) -> None:
    with pytest.raises(SerializationError):
        paglets._resolve_class(name, "state", ("*",))


def test_a_module_that_is_not_imported_and_not_allowed_is_never_imported(module_factory: Any) -> None:
    name, marker = module_factory()
    sibling, sibling_marker = module_factory(name + "_evil")
    for kind in ("state", "enum", "paglet"):
        for allow in ((), ("paglets_tests",), ("os",), (name + ".sub",), (name,)):
            target = sibling if allow == (name,) else name  # an allowed prefix does not match "<prefix>_evil"
            with pytest.raises(ForbiddenError):
                paglets._resolve_class(f"{target}:Thing", kind, allow)
    with pytest.raises(ForbiddenError):
        from_cbor(cbor2.dumps({"$dc": f"{name}:Thing", "$f": {}}))
    with pytest.raises(ForbiddenError):
        from_cbor(cbor2.dumps({"$enum": f"{name}:Thing", "$v": 1}))
    assert [m for m in sys.modules if m.startswith(name)] == []  # sibling starts with name too
    assert not marker.exists() and not sibling_marker.exists()


def test_an_allowed_module_is_imported_and_its_dataclass_resolves(module_factory: Any) -> None:
    name, marker = module_factory()
    cls = paglets._resolve_class(f"{name}:Thing", "state", (name,))
    assert marker.exists() and cls is sys.modules[name].Thing
    assert from_cbor(cbor2.dumps({"$dc": f"{name}:Thing", "$f": {"x": 3}}), allow=[name]) == cls(3)
    with pytest.raises(ForbiddenError):
        paglets._resolve_class(f"{name}:Plain", "state", (name,))
    with pytest.raises(ForbiddenError):
        paglets._resolve_class(f"{name}:Thing", "paglet", (name,))


def test_a_package_prefix_allows_its_submodules(module_factory: Any) -> None:
    name, marker = module_factory(f"paglets_pkg_{uuid.uuid4().hex[:8]}.inner.mod")
    package = name.split(".")[0]
    cls = paglets._resolve_class(f"{name}:Thing", "state", (package,))
    assert marker.exists() and dataclasses.is_dataclass(cls)


def test_star_allows_any_importable_module(module_factory: Any) -> None:
    name, marker = module_factory()
    assert paglets._resolve_class(f"{name}:Thing", "state", ("*",)).__name__ == "Thing"
    assert marker.exists()


def test_an_allowed_module_that_does_not_exist_is_a_clean_error() -> None:
    with pytest.raises(SerializationError):
        paglets._resolve_class("paglets_no_such_module_xyz:Thing", "state", ("*",))


def test_already_imported_modules_resolve_without_an_allow_list() -> None:
    assert paglets._resolve_class("paglets_tests.test_codec:Leaf", "state", ()) is Leaf
    assert paglets._resolve_class("paglets_tests.test_codec:Color", "enum", ()) is Color
    assert paglets._resolve_class("paglets:TransferTicket", "state", ()) is paglets.TransferTicket
    assert paglets._resolve_class("paglets:ServiceScope", "enum", ()) is paglets.ServiceScope
    assert paglets._resolve_class("paglets_tests.test_codec:Tiny", "paglet", ()) is Tiny
    assert paglets._resolve_class("paglets_tests.test_codec:SlotState", "state", ()) is SlotState


def test_a_dataclass_that_is_not_a_paglet_is_refused_as_a_paglet() -> None:
    for name in ("paglets_tests.test_codec:Leaf", "paglets_tests.test_codec:Node", "paglets:Message"):
        with pytest.raises(ForbiddenError):
            paglets._resolve_class(name, "paglet", ("*",))


def test_kind_enum_resolves_only_enums() -> None:
    """A registered state class is not an enum: asking for one must not construct the class."""
    for name in ("paglets_tests.test_codec:Marker", "paglets_tests.test_codec:Leaf", "paglets:Message"):
        with pytest.raises(ForbiddenError):
            paglets._resolve_class(name, "enum", ())
    with pytest.raises((SerializationError, ForbiddenError)):
        from_cbor(cbor2.dumps({"$enum": "paglets_tests.test_codec:Marker", "$v": "attacker value"}))


def test_a_worker_resolver_trusts_names_its_host_checked(module_factory: Any) -> None:
    name, marker = module_factory()
    assert paglets._resolve_class(f"{name}:Thing", "state", None).__name__ == "Thing"
    assert marker.exists()


# -- JSON specifics --------------------------------------------------------------------------------


def test_json_bytes_travel_as_base64_and_bad_base64_is_refused() -> None:
    assert paglets._json_dumps({"b": b"\x00\x01"}) == b'{"b":{"$bytes":"AAE="}}'
    assert paglets._json_loads(b'{"b":{"$bytes":"AAE="}}') == {"b": b"\x00\x01"}
    with pytest.raises(SerializationError):
        paglets._json_loads(b'{"b":{"$bytes":"!!"}}')


@pytest.mark.parametrize("data", [b"", b"{", b"\xff", b"[" * 100_000 + b"]" * 100_000, b'{"a": NaN'])
def test_bad_json_is_a_serialization_error(data: bytes) -> None:
    with pytest.raises(SerializationError):
        paglets._json_loads(data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"not standard JSON: {name}")


def test_json_of_non_finite_floats_is_standard_json_that_round_trips() -> None:
    """Control calls are JSON for any client (curl, jq, browsers): NaN/Infinity tokens are not JSON."""
    value = {"readings": [float("nan"), float("inf"), float("-inf"), 1.5]}
    data = paglets._json_dumps(paglets._wire_encode(value))
    json.loads(data, parse_constant=_refuse_constant)
    assert same(value, json_round_trip(value))
